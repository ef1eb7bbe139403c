"""User-facing errors: one line, an exit code, no traceback."""


class UserError(Exception):
    """Bad input or an unusable environment. The CLI prints the message on one line and exits."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.message = message
        self.code = code


class NoGpuError(UserError):
    """No CUDA driver or no GPU: GPU work cannot run here."""

    def __init__(self, message: str = "no CUDA driver or GPU found", code: int = 3):
        super().__init__(message, code)


class CompileError(Exception):
    """A compiler rejected generated code. Carries the log and where the source was saved."""

    def __init__(self, message: str, log: str = "", source_path: str | None = None):
        where = f" (source saved at {source_path})" if source_path else ""
        super().__init__(f"{message}{where}\n{log}".rstrip())
        self.log = log
        self.source_path = source_path
