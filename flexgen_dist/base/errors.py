"""The exceptions the CLI reports as one line, without a traceback: bad input (exit 2), or a run that cannot go on
after it started (exit 1, like an I/O fault)."""


class UserError(Exception):
    """Bad input (model name, checkpoint, policy, budgets, prompts): reported without a traceback."""

    exit_code = 2


class ContextLengthExceeded(UserError):
    """A prompt and its new tokens do not fit the model's positions (OpenAI's error code for it names it so)."""


class RunFailed(UserError):
    """The run started and cannot finish (a stage lost for good, a cluster that stopped answering); what was written
    is kept, so the same command resumes."""

    exit_code = 1
