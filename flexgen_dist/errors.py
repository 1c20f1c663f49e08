"""The one exception type that means "the user's input is wrong": the CLI prints it as one line and exits 2."""


class UserError(Exception):
    """Bad input (model name, checkpoint, policy, budgets, prompts): reported without a traceback."""
