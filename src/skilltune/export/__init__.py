"""Ship a registered version where the team runs it (:mod:`.build`), checked for train-to-serve parity."""
