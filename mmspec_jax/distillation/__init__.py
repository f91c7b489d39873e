"""What the drafts are distilled on: the target's own answers to training prompts
(target_answers.py, through the decoding session)."""
