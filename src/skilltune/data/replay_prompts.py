"""The bundled general prompts for `data replay` (self-distillation against forgetting).

About 260 prompts (the default `--n 200` plus room) across writing, reasoning, coding, explanation and everyday
questions, built from small hand-written lists so the set is diverse and stable.
"""

from __future__ import annotations

import itertools

_WRITING = ["Write a haiku about {t}.", "Write a short, friendly email inviting a colleague to talk about {t}.",
            "Write a two-sentence story about {t}.", "Describe {t} to someone who has never seen it."]
_WRITING_T = ["autumn leaves", "a rainy city", "the ocean at night", "a lighthouse", "morning coffee", "a mountain trail",
              "an old library", "a busy market", "winter snow", "a quiet garden", "a first day at school",
              "a summer thunderstorm", "a train journey", "a forgotten letter", "the smell of bread",
              "a city at dawn", "a lost umbrella", "a street musician", "a family dinner", "the first snowfall"]
_EXPLAIN = ["Explain {t} in simple terms.", "What are the pros and cons of {t}?", "Give three facts about {t}."]
_EXPLAIN_T = ["photosynthesis", "compound interest", "how vaccines work", "the water cycle", "machine learning",
              "inflation", "how a bicycle stays upright", "renewable energy", "the internet", "sleep and memory",
              "volcanoes", "the stock market", "recycling", "black holes", "the immune system",
              "how rainbows form", "supply and demand", "how batteries store energy", "the seasons", "earthquakes",
              "how airplanes fly", "the human heart", "electric cars", "how bees make honey", "cloud computing"]
_CODE = ["Write a Python function that {t}.", "Explain how you would {t} in JavaScript."]
_CODE_T = ["reverses a string", "checks whether a number is prime", "counts the words in a sentence",
           "finds the largest number in a list", "removes duplicates from a list", "converts Celsius to Fahrenheit",
           "checks if a word is a palindrome", "sums the digits of an integer", "merges two sorted lists",
           "returns the factorial of n", "capitalises every word in a sentence", "computes the average of a list",
           "counts the vowels in a string", "returns the n-th Fibonacci number", "flattens a nested list",
           "checks whether two words are anagrams", "finds the second largest number in a list",
           "converts a number of seconds to hours and minutes"]
_REASON = ["If a train travels {a} km in {b} hours, what is its average speed? Explain briefly.",
           "I have {a} apples and give away {b}. How many are left, and why?",
           "A shop sells pens at {b} dollars each. How much do {a} pens cost?"]
_REASON_AB = [(120, 2), (90, 3), (45, 5), (200, 4), (60, 1), (36, 6), (81, 9), (150, 3), (72, 8), (300, 5),
              (48, 4), (100, 4)]
_EVERYDAY = ["How can I save money on groceries?", "What are good habits for a healthy morning routine?",
             "How do I politely decline an invitation?", "What should I consider when buying a used car?",
             "How do I remove a coffee stain from a shirt?", "Give me tips for a job interview.",
             "How can I sleep better at night?", "What is a simple recipe for dinner tonight?",
             "How do I start learning a new language?", "How can I keep houseplants alive?",
             "What are some indoor activities for a rainy day?", "How do I write a good thank-you note?",
             "How can I reduce stress at work?", "What should I bring on a long flight?",
             "How do I organise a small closet?", "How can I be more productive in the afternoon?",
             "What are good questions to ask a new friend?", "How do I plan a birthday party on a budget?",
             "How do I change a flat bicycle tyre?", "What is a good way to learn to cook?",
             "How do I make a weekly meal plan?", "What are easy ways to drink more water?",
             "How do I prepare for a long hike?", "How can I make my commute more pleasant?",
             "What is a good way to remember people's names?", "How do I start a small vegetable garden?",
             "How can I make a small apartment feel bigger?", "What should I pack for a weekend trip?",
             "How do I keep a conversation going?", "How can I waste less food at home?",
             "What are simple stretches to do at a desk?", "How do I choose a good book to read?",
             "How can I teach a child to ride a bike?", "How do I clean a cast iron pan?",
             "What are tips for taking better photos with a phone?"]


def general_prompts() -> list[str]:
    """The full ordered list (deterministic)."""
    out = [w.format(t=t) for w, t in itertools.product(_WRITING, _WRITING_T)]
    out += [e.format(t=t) for e, t in itertools.product(_EXPLAIN, _EXPLAIN_T)]
    out += [c.format(t=t) for c, t in itertools.product(_CODE, _CODE_T)]
    out += [r.format(a=a, b=b) for r, (a, b) in itertools.product(_REASON, _REASON_AB)]
    out += _EVERYDAY
    return out
