"""MCIP training parts: losses (pure functions), and later the model factory, data loader, engine
and loop shared by the finetune and realign stages."""
