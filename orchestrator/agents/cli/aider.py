"""aider (pip `aider-chat`): OpenAI chat through litellm, plain text on stdout.

aider reads project-level settings from the repository it edits (`.aider.conf.yml`, `.env`
loaded over the environment, `.aider.model.settings.yml`, `.aider.model.metadata.json`);
flags cannot switch that off. So aider is started through a few lines of Python in its own
interpreter that make it look only under the private HOME before handing over to its `main`.
"""

from __future__ import annotations

import json
from pathlib import Path

from orchestrator.agents.cli.base import Launch, base_env, find
from orchestrator.errors import ConfigError
from orchestrator.proxy import Proxy

CONTEXT_TOKENS = 200_000
OUTPUT_TOKENS = 32_000

# The repository's settings files are never searched: only HOME's (and a file named on the
# command line). aider does not retry a failed call: flow's door has retried it already
# (aider's own backoff would add a minute of calls per builder). Each patched name is
# checked first, so an aider that renamed one fails loudly instead of quietly reading the
# repository's settings again.
BOOT = """\
import sys, webbrowser
from pathlib import Path
import aider.coders.base_coder as coder, aider.main as main, aider.models as models
import aider.repomap as repomap
for where, name in [
    (main, "generate_search_path_list"), (main, "get_parser"), (main, "main"),
    (repomap.RepoMap, "TAGS_CACHE_DIR"), (coder, "RETRY_TIMEOUT"), (models, "RETRY_TIMEOUT"),
]:
    assert hasattr(where, name), f"aider lost {name}: flow's aider launcher needs updating"
home = Path.home()
parser = main.get_parser
main.generate_search_path_list = lambda name, root, given: [
    str(p) for p in (home / name, given) if p
]
main.get_parser = lambda config_files, root: parser([str(home / ".aider.conf.yml")], root)
repomap.RepoMap.TAGS_CACHE_DIR = str(home / ".aider-tags")
coder.RETRY_TIMEOUT = models.RETRY_TIMEOUT = 0
webbrowser.open = lambda *args, **kwargs: False
sys.exit(main.main())
"""

SETTINGS = ".aider.model.settings.yml"
METADATA = ".aider.model.metadata.json"
IGNORE = ".aiderignore"


class Aider:
    name = "aider"
    dialect = "chat"
    # The tags cache goes under HOME (see BOOT); this is the fallback if it ever lands here.
    droppings: tuple[str, ...] = (".aider.tags.cache.v*",)
    login_files: tuple[str, ...] = ()  # aider has no login: it is given a provider key

    def __init__(self, command: str = "aider", extra_args: list[str] | None = None):
        self.command = command
        self.extra_args = list(extra_args or [])

    def files(self, model: str) -> dict[str, str]:
        settings = {
            "name": model,
            # aider's pick for an unknown model is `whole` without a repo map: every edit
            # rewrites the file. The models flow proxies are capable of search/replace.
            "edit_format": "diff",
            "use_repo_map": True,
            "weak_model_name": model,
            "editor_model_name": model,
            "editor_edit_format": "editor-diff",
            "extra_params": {"max_retries": 0},  # nor does the OpenAI client under litellm
        }
        # Known context window and zero prices: no warning, no question, no fetch of
        # litellm's price list from GitHub. flow's proxy meters the money.
        metadata = {
            model: {
                "max_input_tokens": CONTEXT_TOKENS,
                "max_output_tokens": OUTPUT_TOKENS,
                "max_tokens": OUTPUT_TOKENS,
                "input_cost_per_token": 0.0,
                "output_cost_per_token": 0.0,
                "litellm_provider": "openai",
                "mode": "chat",
            }
        }
        return {
            SETTINGS: json.dumps([settings]),  # JSON is YAML
            METADATA: json.dumps(metadata),
            IGNORE: "",
            ".aider.conf.yml": "{}\n",
            ".env": "",
        }

    def launch(self, task: str, proxy: Proxy, model_id: str, checkout: Path, home: Path) -> Launch:
        model = f"openai/{model_id}"
        env = base_env(home)
        env.update(
            {
                "OPENAI_API_BASE": f"{proxy.base_url}/v1",
                "OPENAI_API_KEY": proxy.token,
                "LITELLM_LOCAL_MODEL_COST_MAP": "True",
                "HF_HUB_OFFLINE": "1",
            }
        )
        argv = [
            *self.interpreter(),
            "--model", model,
            "--weak-model", model,
            "--editor-model", model,
            "--model-settings-file", str(home / SETTINGS),
            "--model-metadata-file", str(home / METADATA),
            "--env-file", str(home / ".env"),
            "--aiderignore", str(home / IGNORE),
            "--input-history-file", str(home / ".aider.input.history"),
            "--chat-history-file", str(home / ".aider.chat.history.md"),
            "--no-restore-chat-history",
            "--yes-always",
            "--no-auto-commits",
            "--no-dirty-commits",
            "--no-git-commit-verify",
            "--no-gitignore",
            "--no-check-update",
            "--no-show-release-notes",
            "--no-analytics",
            "--no-browser",
            "--no-detect-urls",
            "--disable-playwright",
            "--no-notifications",
            "--no-suggest-shell-commands",
            "--no-show-model-warnings",
            "--no-watch-files",
            "--no-fancy-input",
            "--no-pretty",
            "--encoding", "utf-8",
        ]  # fmt: skip
        # A message starting with / or ! is one of aider's commands (`!cmd` runs a shell).
        message = "\n" + task if task[:1] in ("/", "!") else task
        argv += [*self.extra_args, "--message", message]
        return Launch(argv=argv, env=env, files=self.files(model))

    def interpreter(self) -> list[str]:
        """aider's own Python running BOOT: the console script's `#!` line, or the Python
        beside it (pip writes a /bin/sh preamble for a long path)."""
        exe = find(self.command) or self.command
        script = Path(exe).resolve()
        first = script.read_bytes()[:512].split(b"\n", 1)[0] if script.is_file() else b""
        named = first[2:].decode(errors="replace").strip() if first.startswith(b"#!") else ""
        candidates = [Path(named)] if named else []
        candidates += [script.parent / "python3", script.parent / "python"]
        python = next(
            (p for p in candidates if p.is_absolute() and p.is_file() and "python" in p.name),
            None,
        )
        if not python:
            # Started any other way, aider would read the repository's settings.
            raise ConfigError(
                f"agents.aider.command: {exe} is not found or is not aider's Python console "
                "script (name the `aider` of a pip, pipx or uv install)"
            )
        return [str(python), "-I", "-c", BOOT]

    def login_launch(self, task: str, model_id: str, checkout: Path, home: Path) -> Launch | None:
        return None

    def review(
        self,
        task: str,
        proxy: Proxy,
        model_id: str,
        checkout: Path,
        home: Path,
        schema: dict[str, object],
    ) -> Launch | None:
        return None  # aider edits files; it has no read-only structured answer

    def review_result(self, events: list[dict[str, object]], stdout: bytes) -> object | None:
        return None

    def self_reported(self, events: list[dict[str, object]]) -> tuple[int, int, float] | None:
        return None  # used only on a login, and aider has none

    def failed(self, events: list[dict[str, object]]) -> str | None:
        # aider prints text, not JSON events, and exits 0 after its calls failed: CliBuilder's
        # reading of the proxy log (no call, or the last call, succeeded) is the verdict.
        return None
