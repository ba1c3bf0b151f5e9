"""The ClientApp. Importing it first quiets third-party warnings and progress bars, before the ML
stack loads (its import-time warnings would otherwise reach every node's log)."""

from finetune.logs import quiet_third_party

quiet_third_party()
