"""Reading videos, frame folders and VOS datasets; clip sampling, augmentation, DataModules."""
