"""The FLAN-style task bank: tasks and templates (bank.py), built-in families (families/), YAML-defined tasks
(yaml_tasks.py). Held-out evaluation and contamination checks are in eval/heldout.py and eval/contamination.py."""
