"""Offline evaluation: prompt sets, scoring folders or generated images with a RewardSet, reports.

`tiltflow eval` is wired from tiltflow.eval.harness: add_eval_arguments(parser) and run_eval(args).
"""

from tiltflow.eval.prompts import Prompt, PromptFileError, load_prompts

__all__ = ["Prompt", "PromptFileError", "load_prompts"]
