"""The typed configuration schema: one section per concern of the workflow.

Every field is documented where it is declared; this is the YAML file, the
``--set section.field=value`` overrides and the text of ``skilltune config show``.
Validation happens here, before any model is loaded.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

EMBEDDED_DEFAULT = "embedded:smollm2-135m-instruct"


class Section(BaseModel):
    """Base of every section: unknown keys are errors (a typo must never be ignored)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    base: str = Field(
        EMBEDDED_DEFAULT,
        description="Base model: 'embedded:smollm2-135m-instruct', a registered version 'NAME@vN' (train on top of "
        "it, e.g. DPO after SFT), a local HF model directory, a .gguf file, or a hub id that is already in the "
        "local Hugging Face cache.",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) for hub ids.")
    trust_remote_code: bool = Field(
        False, description="Run modelling code shipped with the model. Off unless you trust its author."
    )
    allow_pickle: bool = Field(
        False, description="Allow loading pickle (.bin) weights. Off: safetensors only, pickle can run code."
    )
    chat_template: str | None = Field(
        None, description="The chat template: a Jinja string, or a built-in by name: 'plain' (Question:/Answer: "
        "text ending in the end-of-sequence token, no control tokens: for base models), 'chatml', 'family' (the "
        "model family's instruct format). Default: the model's own, else its family's, else ChatML.",
    )


class ColumnMap(Section):
    prompt: str | None = Field(None, description="Column holding the prompt (CSV/Parquet/JSON).")
    completion: str | None = Field(None, description="Column holding the completion.")
    system: str | None = Field(None, description="Optional column holding a system prompt.")


class DataConfig(Section):
    train: str | None = Field(None, description="Training data file (JSONL, JSON array, CSV or Parquet).")
    val: str | None = Field(None, description="Validation file. If absent, `val_split` of train is held out.")
    test: str | None = Field(None, description="Held-out test file for `skilltune eval`.")
    format: str = Field(
        "auto", description="Row format: 'auto' (detected per file) or a registered format (prompt_completion, "
        "messages, alpaca, sharegpt, or one a plug-in registers)."
    )
    columns: ColumnMap = Field(default_factory=ColumnMap, description="Column mapping for tabular files.")
    val_split: float = Field(
        0.1, ge=0.0, lt=0.5, description="Fraction of train held out for validation when `val` is not set."
    )
    system_prompt: str | None = Field(None, description="System prompt added to rows that have none.")
    near_dup_threshold: float = Field(
        0.85, gt=0.0, le=1.0, description="Jaccard similarity (MinHash) above which two rows are near-duplicates."
    )


class AdapterConfig(Section):
    method: str = Field(
        "lora", description="Finetuning method from the methods registry: lora (default), qlora (4-bit base, needs "
        "CUDA), dora, full, or one a plug-in registers."
    )
    r: int = Field(16, ge=1, le=1024, description="LoRA rank.")
    alpha: float = Field(32, gt=0, description="LoRA alpha (scaling = alpha / r, or alpha / sqrt(r) with rslora).")
    dropout: float = Field(
        0.0, ge=0.0, lt=1.0,
        description="Dropout on the LoRA input. 0 by default: on CPU it cost 27% of step time (bench/NOTES.md); "
        "validation with early stopping guards against overfitting instead.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Modules to adapt: 'all-linear' or a list of module names (q_proj, v_proj...)."
    )
    rslora: bool = Field(False, description="Rank-stabilised LoRA scaling.")


class TrainConfig(Section):
    objective: str = Field(
        "sft", description="Training objective from the objectives registry: sft (demonstrations, the default) or "
        "dpo (preference pairs: prompt/chosen/rejected; the reference is the starting model).")
    dpo_beta: float = Field(
        0.1, gt=0, le=10, description="DPO's beta: how far the policy may move from the reference (higher: closer).")
    epochs: float = Field(3, gt=0, description="Passes over the training data.")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps (overrides epochs).")
    lr: float = Field(2e-4, gt=0, lt=1, description="Peak learning rate.")
    batch_size: int = Field(8, ge=1, description="Examples per micro-batch (per process).")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description="Learning-rate schedule.")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Fraction of steps spent warming up the LR.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    max_seq_len: int = Field(1024, ge=16, description="Longest example in tokens; longer ones are refused, not cut.")
    seed: int = Field(42, description="Seed for data order, dropout and initialisation.")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="'auto': bf16 where the CPU (AMX/avx512_bf16) or GPU supports it, else fp32."
    )
    packing: bool = Field(
        True, description="Pack examples into rows without padding; attention stays within each example."
    )
    train_on_inputs: bool = Field(False, description="Also train on prompt tokens (default: completion-only loss).")
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory.")
    share_prefix: bool = Field(
        True, description="Compute a prompt prefix that all examples of a micro-batch share (a system prompt, "
        "few-shot examples) once per row instead of once per example. Same loss; used only when the prefix "
        "carries no labels (not with train_on_inputs)."
    )
    kernels: bool = Field(
        True, description="On CPU, use skilltune's training kernels (fused LoRA layer, RMSNorm, attention; "
        "measured in bench/NOTES.md). false: the stock transformers/peft code paths."
    )
    neftune_noise_alpha: float | None = Field(
        None, gt=0, le=100, description="NEFTune (named as in TRL, Axolotl and LLaMA-Factory): uniform noise on the "
        "input embeddings while training, of magnitude alpha / sqrt(row length x hidden size) (transformers' hook, so "
        "values carry over from those tools' configs; the paper used 5-15). Validation, evaluation and the saved "
        "model see no noise. Supervised finetuning only.")
    loraplus_lr_ratio: float | None = Field(
        None, gt=0, le=1000, description="LoRA+ (named as in LLaMA-Factory and Axolotl): the adapter's B matrices "
        "learn at train.lr x this ratio, the A matrices at train.lr (the paper recommends 16 with a lower "
        "train.lr). LoRA and DoRA adapters only.")
    eval_steps: int | None = Field(None, ge=1, description="Validate every N steps (default: once per epoch).")
    early_stopping_patience: int | None = Field(
        None, ge=1, description="Stop after this many validations without improvement of val loss."
    )
    save_steps: int = Field(50, ge=1, description="Write a checkpoint every N optimizer steps.")
    save_total_limit: int = Field(2, ge=1, description="Keep the last K checkpoints.")
    logging_steps: int = Field(5, ge=1, description="Send metrics to W&B/MLflow every N steps (metrics.jsonl, "
                               "loss.png and TensorBoard get every step).")
    report_to: list[str] = Field(
        default_factory=lambda: ["tensorboard"], description="Experiment trackers from the trackers registry "
        "(tensorboard, wandb, mlflow); metrics.jsonl is always written."
    )
    output_dir: str = Field("runs", description="Parent folder of run directories.")
    threads: int | None = Field(None, ge=1, description="CPU threads for torch (default: all cores).")


class EvalConfig(Section):
    metrics: list[str] = Field(
        default_factory=lambda: ["exact_match"],
        description="Metric names from the registry, or 'module:function' for your own.",
    )
    max_new_tokens: int = Field(256, ge=1, description="Generation budget per example.")
    batch_size: int = Field(16, ge=1, description="Prompts generated together.")
    temperature: float = Field(0.0, ge=0, description="0 = greedy decoding.")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="Weights for generation and scoring: 'auto' is bf16 where the CPU computes it fast "
        "(AMX/avx512_bf16; twice the tokens/s), else fp32. A greedy answer can differ from fp32's where two tokens "
        "nearly tie; the metrics stay within noise (bench/NOTES.md).")
    db: str | None = Field(None, description="SQLite database for the sql_exec metric.")
    json_schema: str | None = Field(None, description="JSON Schema file for the json_schema metric.")
    grammar: str | None = Field(
        None, description="Lark grammar file the grammar response format decodes under (e.g. one SQL query over "
        "eval.db's schema: `skilltune data sql-grammar DB --out sql.lark`).")
    response_format: str = Field(
        "text", description="How answers are decoded, as OpenAI's response_format: text, json_object (any JSON "
        "object), json_schema (under eval.json_schema's grammar) or grammar (under eval.grammar, a server's "
        "structured_outputs.grammar): evaluate the model as a server asked for that format answers.")
    price_per_hour: float = Field(1.0, ge=0, description="Cost of the serving machine per hour, for cost estimates.")
    overfit_gap: float = Field(0.1, ge=0, description="Val-vs-test metric gap above which overfitting is flagged.")
    forgetting_threshold: float = Field(
        0.1, ge=0, description="Drop on the general-skills suite above which forgetting is flagged."
    )
    targets: dict[str, float] = Field(
        default_factory=dict, description="Business targets, metric -> threshold (e.g. sql_exec: 0.9, "
        "latency_p95_s: 2.5): any metric of eval.metrics, or latency_p95_s, cost_per_1000_requests, forgetting_drop. "
        "Judged on the 95% interval, not the point estimate.")
    scorecard_criteria: list[str] | None = Field(
        None, description="What people judge in `skilltune scorecard create` for this task (default: relevance, "
        "factual_accuracy, safety; add e.g. brand_voice for a voice task).")


class ServeConfig(Section):
    host: str = Field("127.0.0.1", description="Interface to listen on.")
    port: int = Field(8000, ge=1, le=65535, description="Port to listen on.")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="Weights of the served model: 'auto' is bf16 where the CPU computes it fast "
        "(AMX/avx512_bf16), else fp32 (as eval.precision, so the evaluation measures what is served).")
    api_key_env: str | None = Field(None, description="Environment variable holding the API key (auth on if set).")
    api_keys_file: str | None = Field(
        None, description="File of API keys, one 'NAME:KEY' per line ('#' starts a comment): several clients, each "
        "logged and rate-limited by NAME. Auth is on when this or api_key_env is set.")
    max_tokens_limit: int = Field(1024, ge=1, description="Largest max_tokens a request may ask for.")
    max_prompt_tokens: int | None = Field(
        None, ge=1, description="Longest prompt in tokens (default: the model's context length); prompt + "
        "max_tokens over the context is a 400 context_length_exceeded.")
    max_body_bytes: int = Field(4 * 1024**2, ge=1024, description="Largest request body; bigger ones get 413.")
    body_timeout_s: float = Field(30, gt=0, description="Seconds a request body may take to arrive; slower is a 408.")
    max_request_compute: int = Field(
        4_000_000, ge=1, description="Largest prompt tokens x max_tokens one request may ask for (a 400 above it), "
        "so no single request holds the engine for long.")
    queue_size: int = Field(64, ge=1, description="Pending requests before 429.")
    continuous_batching: bool = Field(
        True, description="A request joins the running batch between decode steps and leaves when it stops "
        "(false: batches run to their end). Models with sliding-window layers are always served in batches.")
    per_key_concurrency: int = Field(16, ge=1, description="Requests one API key may have in flight (429 above).")
    per_key_rate: float | None = Field(
        None, gt=0, description="Requests per second one API key may send, with bursts of twice that (429 above).")
    request_timeout_s: float = Field(120, gt=0, description="Per-request timeout; decoding stops when it passes.")
    ready_stall_s: float = Field(
        30, gt=0, description="/ready answers 503 when work waits and the engine made no progress for this long.")
    grace_period_s: float = Field(
        30, ge=0, description="On SIGTERM: stop accepting, finish in-flight requests for up to this long, then exit.")
    log_requests: bool = Field(True, description="Record every request in the request log.")
    redact_pii: bool = Field(True, description="Redact PII in the request log.")
    drift_threshold: float = Field(
        0.25, gt=0, description="`skilltune monitor` flags input drift when the score passes this value.")
    expected_rps: float | None = Field(
        None, gt=0, description="The load this service must carry (requests/s): the readiness checklist passes "
        "cost and latency only with a load test (`skilltune loadtest`) that served it with <= 1% errors.")


class SkilltuneConfig(Section):
    """The whole configuration of a skilltune project."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)

    @model_validator(mode="after")
    def _cross_field_checks(self) -> "SkilltuneConfig":
        if self.adapter.method == "full" and self.adapter.r != 16:
            # r is ignored by full finetuning; a changed value hints at a mix-up.
            raise ValueError("adapter.r is set but adapter.method is 'full', which trains all weights (no rank)")
        if self.train.objective == "dpo" and self.train.train_on_inputs:
            raise ValueError("train.train_on_inputs is set but train.objective is 'dpo', which scores the two answers "
                             "only (the prompt they share cancels out)")
        if self.train.neftune_noise_alpha is not None and self.train.objective != "sft":
            raise ValueError(f"train.neftune_noise_alpha is set but train.objective is '{self.train.objective}'; "
                             "NEFTune noises demonstrations (sft), as in TRL: remove it or set train.objective: sft")
        if self.train.dpo_beta != 0.1 and self.train.objective == "sft":
            raise ValueError("train.dpo_beta is set but train.objective is 'sft'; set train.objective: dpo to use it")
        return self
