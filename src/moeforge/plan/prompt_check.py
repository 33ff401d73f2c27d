"""The prompts' token check, run in a helper process while the plan is made.

Counting a prompt's tokens needs the base model's tokenizer, and with it transformers, whose import
takes about as long as all the rest of validation (0.9 s of 2 s for a SmolLM2-shape merge; the plan's
own imports, pandas and pandera, take most of the rest). Validation sits on the critical path of every
build, so the check runs in a process of its own beside the plan: validation then takes the longer of
the two, not their sum. Its error is raised in the validate job as if it had been found there.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from moeforge import errors
from moeforge.errors import BuildError, ModelError, MoeforgeError
from moeforge.io.hf_load import load_tokenizer
from moeforge.plan.gate_settings import PROMPTLESS_MODES, check_prompt_tokens, recipe_gate_spec
from moeforge.plan.params import read_params
from moeforge.plan.prompts import check_smoke_prompts
from moeforge.plan.recipe import load_recipe


def check_prompts(recipe_path: Path, base_meta: Path) -> None:
    """Every prompt, rendered as the gates will read it, has a token and fits the base's context; and every
    prompt the smoke test runs has a token as a user's tokenizer call reads it."""
    recipe = load_recipe(recipe_path).to_dict()
    tokenizer = load_tokenizer(base_meta, ModelError, "the base model's tokenizer",
                               "the gates and the smoke test read the prompts with it: check the base's tokenizer "
                               "files", generic=True)
    spec = recipe_gate_spec(recipe)
    if spec.mode not in PROMPTLESS_MODES:
        max_positions = read_params(recipe["base_model"], base_meta)[2].get("max_position_embeddings")
        check_prompt_tokens(spec, tokenizer, max_positions)
    check_smoke_prompts(recipe, tokenizer)


class PromptCheck:
    """``check_prompts`` running in a child process; ``result()`` waits for it and raises its error.

    As a context, leaving it early (the plan failed first) stops the child, so only the first error
    is reported.
    """

    def __init__(self, recipe_path: Path, base_meta: Path) -> None:
        command = [sys.executable, "-m", "moeforge.plan.prompt_check", str(recipe_path), str(base_meta)]
        self._process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         stdin=subprocess.DEVNULL, text=True, encoding="utf-8")

    def __enter__(self) -> PromptCheck:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._process.poll() is None:
            self._process.kill()
        self._process.communicate()

    def result(self) -> None:
        """Wait for the check: its output goes to this job's stderr (and log); its error is raised here."""
        out, err = self._process.communicate()
        if err:
            sys.stderr.write(err)
        if self._process.returncode == 0:
            return
        try:
            raised = json.loads(out)
            error = getattr(errors, raised["type"], MoeforgeError)
        except (ValueError, KeyError, TypeError):
            raise BuildError(f"the prompt check ended with exit code {self._process.returncode} and no verdict",
                             "moeforge.plan.prompt_check", "see the error above in this log") from None
        raise error(raised["what"], raised["where"], raised["fix"])


def main(argv: list[str]) -> int:
    """Check; a user's fault goes to stdout as JSON for the parent to raise, with exit code 1."""
    try:
        check_prompts(Path(argv[0]), Path(argv[1]))
    except MoeforgeError as exc:
        print(json.dumps({"type": type(exc).__name__, "what": exc.what, "where": exc.where, "fix": exc.fix}))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
