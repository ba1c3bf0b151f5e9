"""The ServerApp. Importing it first quiets third-party warnings and progress bars, before the ML
stack loads; the run's own ``debug.log`` keeps them."""

from finetune.logs import quiet_third_party

quiet_third_party()
