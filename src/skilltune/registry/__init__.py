"""Ship stage: a registry of versions with lineage, aliases, promote and one-command rollback."""
