"""`hippoctl run MODEL` on a terminal: an interactive chat with `ollama run`'s commands.

/set parameter, /set system, /set verbose|quiet, /set format json|noformat, /set think|nothink,
/set history|nohistory, /show info|parameters|system|template|modelfile, /load, /clear, /bye,
and \"\"\" for multi-line input. Lines are kept with readline in $HIPPO_HOME/history across runs.
Ctrl-C stops the answer being written (the daemon cancels it) and keeps the session.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hippoctl import main as cli
from hippoctl.client import Client, HippoError

HISTORY_LINES = 1000
INT_PARAMETERS = {"num_predict", "seed", "top_k", "num_ctx", "repeat_last_n", "num_keep"}
FLOAT_PARAMETERS = {"temperature", "top_p", "min_p", "typical_p", "repeat_penalty",
                    "presence_penalty", "frequency_penalty"}

HELP = """Available Commands:
  /set            Set session variables
  /show           Show model information
  /load <model>   Load a session or model
  /clear          Clear session context
  /bye            Exit
  /?, /help       Help for a command
  /? shortcuts    Help for keyboard shortcuts

Use \"\"\" to begin a multi-line message."""

SET_HELP = """Available Commands:
  /set parameter ...     Set a parameter
  /set system <string>   Set system message
  /set history           Enable history
  /set nohistory         Disable history
  /set format json       Enable JSON mode
  /set noformat          Disable formatting
  /set think             Enable thinking
  /set nothink           Disable thinking
  /set verbose           Show LLM stats
  /set quiet             Disable LLM stats"""

PARAMETER_HELP = """Available Parameters:
  /set parameter seed <int>             Random number seed
  /set parameter num_predict <int>      Max number of tokens to predict
  /set parameter top_k <int>            Pick from top k num of tokens
  /set parameter top_p <float>          Pick token based on sum of probabilities
  /set parameter min_p <float>          Pick token based on top token probability * min_p
  /set parameter num_ctx <int>          Set the context size
  /set parameter temperature <float>    Set creativity level
  /set parameter repeat_penalty <float> How strongly to penalize repetitions
  /set parameter repeat_last_n <int>    Set how far back to look for repetitions
  /set parameter stop <string> <string> ...   Set the stop parameters"""

SHOW_HELP = """Available Commands:
  /show info         Show details for this model
  /show modelfile    Show Modelfile for this model
  /show parameters   Show parameters for this model
  /show system       Show system message
  /show template     Show prompt template"""

SHORTCUTS = """Available keyboard shortcuts:
  Ctrl + a            Move to the beginning of the line (Home)
  Ctrl + e            Move to the end of the line (End)
  Ctrl + k            Delete the sentence after the cursor
  Ctrl + u            Delete the sentence before the cursor
  Ctrl + w            Delete the word before the cursor
  Ctrl + l            Clear the screen
  Ctrl + c            Stop the model from responding
  Ctrl + d            Exit (/bye)"""


@dataclass
class Session:
    model: str
    options: dict[str, Any] = field(default_factory=dict)
    system: str | None = None
    format: str | None = None
    think: bool | None = None
    verbose: bool = False
    history: bool = True
    messages: list[dict] = field(default_factory=list)

    def body(self, args: argparse.Namespace) -> dict:
        args = argparse.Namespace(**{**vars(args), "model": self.model})
        system = [{"role": "system", "content": self.system}] if self.system else []
        body = cli.chat_body(args, system + self.messages)
        if self.options:
            body["options"] = {**body.get("options", {}), **self.options}
        if self.format:
            body["format"] = self.format
        if self.think is not None:
            body["think"] = self.think
        return body


def history_file() -> Path:
    home = os.environ.get("HIPPO_HOME")
    return (Path(os.path.expanduser(home)) if home else Path.home() / ".hippo") / "history"


def chat_repl(client: Client, args: argparse.Namespace) -> int:
    """An interactive chat that keeps the conversation, like `ollama run MODEL` on a terminal."""
    session = Session(model=args.model, verbose=bool(args.verbose))
    client.post("/api/chat", session.body(args))  # load now, so a bad name fails before the prompt
    readline = _start_history()
    return _loop(client, args, session, readline)


def _loop(client: Client, args: argparse.Namespace, session: Session, readline) -> int:
    while True:
        try:
            line = read_message()
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print("\nUse Ctrl + d or /bye to exit.")
            continue
        if readline is not None and session.history and line.strip():
            _append_history(readline)
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            try:
                if command(client, args, session, text) == "bye":
                    return 0
            except HippoError as e:
                print(f"Error: {e}", file=sys.stderr)
            continue
        ask(client, args, session, line)


def ask(client: Client, args: argparse.Namespace, session: Session, text: str) -> None:
    session.messages.append({"role": "user", "content": text})
    try:
        answer, final = cli.stream_chat(client, session.body(args))
    except KeyboardInterrupt:  # stop this answer, keep the session; the turn is forgotten
        session.messages.pop()
        print()
        return
    except HippoError as e:
        session.messages.pop()
        print(f"Error: {e}", file=sys.stderr)
        return
    session.messages.append({"role": "assistant", "content": answer})
    print()
    if session.verbose:
        cli.print_stats(final)
        print(file=sys.stderr)


def command(client: Client, args: argparse.Namespace, session: Session, text: str) -> str | None:
    word, _, rest = text.partition(" ")
    rest = rest.strip()
    if word in ("/bye", "/exit"):
        return "bye"
    if word == "/clear":
        session.messages.clear()
        print("Cleared session context")
    elif word in ("/?", "/help"):
        print({"shortcuts": SHORTCUTS, "shortcut": SHORTCUTS, "/set": SET_HELP, "set": SET_HELP,
               "/show": SHOW_HELP, "show": SHOW_HELP}.get(rest, HELP))
    elif word == "/set":
        set_variable(session, rest)
    elif word == "/show":
        show(client, session, rest)
    elif word == "/load":
        if not rest:
            print("Usage:\n  /load <modelname>")
        else:
            client.post("/api/chat", {"model": rest, "messages": []})
            session.model, session.messages = rest, []
            print(f"Loading model '{rest}'")
    else:
        print(f"Unknown command '{word}'. Type /? for help")
    return None


def set_variable(session: Session, rest: str) -> None:
    what, _, value = rest.partition(" ")
    value = value.strip()
    if what == "parameter":
        set_parameter(session, value)
    elif what == "system":
        session.system = value.strip('"') or None
        print("Set system message.")
    elif what in ("verbose", "quiet"):
        session.verbose = what == "verbose"
        print("Set 'verbose' mode." if session.verbose else "Set 'quiet' mode.")
    elif what in ("history", "nohistory"):
        session.history = what == "history"
        print("Set history." if session.history else "Set 'nohistory' mode.")
    elif what == "format":
        if value != "json":
            print("Invalid or missing format. For 'json' mode use '/set format json'")
            return
        session.format = "json"
        print("Set format to 'json' mode.")
    elif what == "noformat":
        session.format = None
        print("Disabled format.")
    elif what in ("think", "nothink"):
        session.think = what == "think"
        print("Set 'think' mode." if session.think else "Set 'nothink' mode.")
    else:
        print(SET_HELP if not what else f"Unknown command '/set {what}'. Type /? for help")


def set_parameter(session: Session, text: str) -> None:
    name, *values = text.split()
    if not name or not values:
        print(PARAMETER_HELP)
        return
    if name == "stop":
        session.options["stop"] = values
        print(f"Set parameter '{name}' to '{', '.join(values)}'")
        return
    if name not in INT_PARAMETERS | FLOAT_PARAMETERS:
        print(f"Couldn't set parameter: unknown parameter '{name}'")
        return
    try:
        value = int(values[0]) if name in INT_PARAMETERS else float(values[0])
    except ValueError:
        kind = "an integer" if name in INT_PARAMETERS else "a number"
        print(f"Couldn't set parameter: {name} must be {kind}, not {values[0]!r}")
        return
    session.options[name] = value
    print(f"Set parameter '{name}' to '{values[0]}'")


def show(client: Client, session: Session, what: str) -> None:
    if what not in ("info", "modelfile", "parameters", "system", "template"):
        print(SHOW_HELP if not what else f"Unknown command '/show {what}'. Type /? for help")
        return
    if what == "system":
        print(session.system or "No system message was specified for this model.")
        return
    info = client.post("/api/show", {"model": session.model})
    if what == "info":
        print(cli.render_show(info), end="")
    elif what == "modelfile":
        print(info.get("modelfile") or "")
    elif what == "template":
        print(info.get("template") or "No prompt template was specified for this model.")
    else:
        lines = [f"{name:<24}{value}" for name, value in session.options.items()]
        model_lines = (info.get("parameters") or "").strip()
        if model_lines:
            print("Model defined parameters:\n" + model_lines + "\n")
        if lines:
            print("User defined parameters:\n" + "\n".join(lines))
        if not lines and not model_lines:
            print("No parameters were specified for this model.")


def read_message() -> str:
    """One line, or several between triple quotes."""
    line = input(">>> ")
    if not line.lstrip().startswith('"""'):
        return line
    text = line.lstrip()[3:]
    while not text.rstrip().endswith('"""'):
        text += "\n" + input("... ")
    return text.rstrip()[:-3].strip("\n")


# -- history ------------------------------------------------------------------------------------


def _start_history():
    """readline with this user's history loaded; None where readline is missing (Windows)."""
    try:
        import readline
    except ImportError:
        return None
    readline.set_history_length(HISTORY_LINES)
    with contextlib.suppress(OSError):
        readline.read_history_file(history_file())
        if readline.get_current_history_length() >= HISTORY_LINES:
            readline.write_history_file(history_file())  # keep the file to the last lines
    return readline


def _append_history(readline) -> None:
    """Write each line as it is entered, so a crash or a closed terminal keeps it."""
    path = history_file()
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            path.touch(mode=0o600)
        readline.append_history_file(1, path)
