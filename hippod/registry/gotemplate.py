"""Translate an Ollama TEMPLATE (Go text/template) into a Jinja chat template.

hippo renders prompts with the model's Jinja chat template (tokenizer_config.json), so a
Modelfile's TEMPLATE is translated once, at create time, rather than interpreted per request.
The subset covers the forms Ollama's own templates use: `.System`, `.Prompt`, `.Response`,
`range .Messages` (also `range $i, $m := ...`), `.Role`, `.Content`, `.Tools`, `.ToolCalls`,
`if`/`else if`/`else`/`with`, `$var :=`, the comparison and logic functions, `len`, `slice`,
`index`, `json`, and trim markers `{{-`/`-}}`. Anything else is refused with the construct
named, never guessed.

Legacy templates (`.Prompt`/`.Response`, no `.Messages`) are rendered once per user turn, as
Ollama does: the part after `{{ .Response }}` is left out of the turn being generated.
"""

from __future__ import annotations

import json
import re

ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)
TOKEN = re.compile(r'\s*(\$\w*(?:\.\w+)*|\.[\w.]*|"(?:[^"\\]|\\.)*"|`[^`]*`|-?\d+(?:\.\d+)?|\w+|[()]|:=|=|,|\|)')

# Go field -> Jinja attribute of a message, tool call, or tool.
FIELDS = {"Role": "role", "Content": "content", "ToolCalls": "tool_calls", "Function": "function",
          "Name": "name", "Arguments": "arguments", "Thinking": "thinking",
          "Images": "images", "ToolName": "tool_name", "Type": "type",
          "Description": "description", "Parameters": "parameters",
          "Properties": "properties", "Required": "required", "Enum": "enum", "Items": "items",
          "Index": "index", "ID": "id", "Key": "key", "Value": "value"}
# Top-level (`$.X`) names -> variables the Jinja template sees.
ROOT = {"System": "system", "Prompt": "prompt", "Response": "response", "Messages": "messages",
        "Tools": "tools", "Think": "enable_thinking", "ThinkLevel": "reasoning_effort"}
COMPARE = {"eq": "==", "ne": "!=", "lt": "<", "le": "<=", "gt": ">", "ge": ">="}


class TemplateError(ValueError):
    """The template uses Go template features hippo does not translate (named in the message)."""


class _Scope:
    def __init__(self, dot: str, kind: str):
        self.dot, self.kind = dot, kind


class Translator:
    def __init__(self):
        self.scopes = [_Scope("", "root")]
        self.loops = 0

    # -- expressions ----------------------------------------------------------------------

    def field(self, path: str, base: str) -> str:
        """`.A.B` relative to `base` (a Jinja expression; '' at the root)."""
        parts = [p for p in path.split(".") if p]
        if not parts:
            if not base:
                raise TemplateError("'{{ . }}' at the top level is not supported")
            return base
        out = base
        for i, p in enumerate(parts):
            if not out:
                if p not in ROOT:
                    raise TemplateError(f"unknown template field .{p}")
                out = ROOT[p]
                continue
            if p not in FIELDS:
                raise TemplateError(f"unknown template field .{p}")
            out = f"{out}.{FIELDS[p]}"
        return out

    def operand(self, tok: str) -> str:
        if tok == "$":
            raise TemplateError("'{{ $ }}' alone is not supported")
        if tok.startswith("$."):
            return self.field(tok[1:], "")
        if tok.startswith("$"):
            name, _, rest = tok.partition(".")
            var = "vars.v_" + name[1:]
            return self.field("." + rest, var) if rest else var
        if tok.startswith("."):
            return self.field(tok, self.scopes[-1].dot)
        if tok.startswith('"'):
            return json.dumps(json.loads(tok))
        if tok.startswith("`"):
            return json.dumps(tok[1:-1])
        if re.fullmatch(r"-?\d+(?:\.\d+)?", tok):
            return tok
        if tok in ("true", "false"):
            return tok
        if tok == "nil":
            return "none"
        raise TemplateError(f"unsupported template function or value {tok!r}")

    def call(self, name: str, args: list[str]) -> str:
        if name == "eq" and len(args) > 2:  # Go: equal to any of the rest
            return "(" + " or ".join(f"{args[0]} == {a}" for a in args[1:]) + ")"
        if name in COMPARE:
            if len(args) != 2:
                raise TemplateError(f"'{name}' with {len(args)} arguments is not supported")
            return f"({args[0]} {COMPARE[name]} {args[1]})"
        if name in ("and", "or"):
            return "(" + f" {name} ".join(args) + ")"
        if name == "not" and len(args) == 1:
            return f"(not {args[0]})"
        if name == "len" and len(args) == 1:
            return f"({args[0]} | length)"
        if name == "json" and len(args) == 1:
            return f"({args[0]} | tojson)"
        if name == "index" and len(args) == 2:
            return f"{args[0]}[{args[1]}]"
        if name == "slice" and len(args) in (2, 3):
            return f"{args[0]}[{args[1]}:{args[2] if len(args) == 3 else ''}]"
        if name == "printf" and args:
            return self.printf(args[0], args[1:])
        raise TemplateError(f"unsupported template function {name!r}")

    @staticmethod
    def printf(fmt: str, args: list[str]) -> str:
        """`printf` with %s, %v and %d only (what Ollama's templates use), as concatenation."""
        try:
            text = json.loads(fmt)
        except ValueError:
            raise TemplateError("printf needs a literal format string") from None
        pieces = re.split(r"(%[^%svd]|%[svd%])", text)
        parts, i = [], 0
        for piece in pieces:
            if piece in ("%s", "%v", "%d"):
                if i >= len(args):
                    raise TemplateError("printf has fewer arguments than verbs")
                parts.append(f"({args[i]} | string)")
                i += 1
            elif piece == "%%":
                parts.append(json.dumps("%"))
            elif piece.startswith("%") and len(piece) == 2:
                raise TemplateError(f"printf verb {piece!r} is not supported")
            elif piece:
                parts.append(json.dumps(piece))
        if i != len(args):
            raise TemplateError("printf has more arguments than verbs")
        return "(" + " ~ ".join(parts or ['""']) + ")"

    def expr(self, tokens: list[str]) -> str:
        pos = 0

        def term():
            nonlocal pos
            tok = tokens[pos]
            pos += 1
            if tok == "(":
                value = command(")")
                pos += 1
                return value
            if re.fullmatch(r"[A-Za-z_]\w*", tok) and tok not in ("true", "false", "nil"):
                args = []
                while pos < len(tokens) and tokens[pos] not in (")", "|"):
                    args.append(term())
                return self.call(tok, args)
            return self.operand(tok)

        def command(stop):
            nonlocal pos
            first = tokens[pos]
            if re.fullmatch(r"[A-Za-z_]\w*", first) and first not in ("true", "false", "nil"):
                return term()
            value = term()
            if pos < len(tokens) and tokens[pos] != stop:
                raise TemplateError(f"unsupported template expression {' '.join(tokens)!r}")
            return value

        if "|" in tokens:
            raise TemplateError("template pipelines ('|') are not supported")
        value = command(None)
        if pos != len(tokens):
            raise TemplateError(f"unsupported template expression {' '.join(tokens)!r}")
        return value

    # -- statements -----------------------------------------------------------------------

    def action(self, body: str) -> tuple[str, str]:
        """One `{{ ... }}` -> (kind, Jinja text); kind is 'output', 'tag' or 'comment'."""
        body = body.strip()
        if body.startswith("/*"):
            return "comment", ""
        tokens = TOKEN.findall(body)
        if "".join(t.strip() for t in tokens) != re.sub(r"\s+", "", body):
            raise TemplateError(f"cannot parse template action {{{{ {body} }}}}")
        if not tokens:
            raise TemplateError("empty template action {{ }}")
        head = tokens[0]
        if head == "if":
            self.scopes.append(_Scope(self.scopes[-1].dot, "if"))
            return "tag", f"if {self.expr(tokens[1:])}"
        if head == "else":
            if len(self.scopes) == 1:
                raise TemplateError("{{ else }} without {{ if }}")
            kind = self.scopes[-1].kind
            if len(tokens) > 2 and tokens[1] == "if":
                if kind != "if":
                    raise TemplateError(f"{{{{ else if }}}} inside {{{{ {kind} }}}}")
                return "tag", f"elif {self.expr(tokens[2:])}"
            if len(tokens) > 1:
                raise TemplateError(f"unsupported template action {{{{ {body} }}}}")
            if kind == "with":  # the else branch of with sees the outer dot
                self.scopes[-1].dot = self.scopes[-2].dot
            return "tag", "else"
        if head == "end":
            if len(self.scopes) == 1:
                raise TemplateError("{{ end }} without an opening action")
            scope = self.scopes.pop()
            if scope.kind == "range":
                self.loops -= 1
                return "tag", "endfor"
            return "tag", "endif"
        if head == "range":
            return "range", self._range(tokens[1:])
        if head == "with":
            value = self.expr(tokens[1:])
            self.scopes.append(_Scope(value, "with"))
            return "tag", f"if {value}"
        if head in ("break", "continue") and len(tokens) == 1:
            if not self.loops:
                raise TemplateError(f"{{{{ {head} }}}} outside {{{{ range }}}}")
            return "tag", head  # transformers enables Jinja's loop controls
        if head in ("template", "define", "block", "break", "continue"):
            raise TemplateError(f"template action {{{{ {head} }}}} is not supported")
        if head.startswith("$") and len(tokens) > 2 and tokens[1] in (":=", "="):
            return "tag", f"set vars.v_{head[1:]} = {self.expr(tokens[2:])}"
        value = self.expr(tokens)
        if not re.fullmatch(r"[A-Za-z_]\w*(\.\w+)*", value):
            return "output", value
        # Go prints tools, functions and arguments as JSON (their String methods); so do we.
        return "output", (f"{value} if {value} is string else (({value} | tojson) "
                          f"if {value} is defined and {value} is not none else '')")

    def _range(self, tokens: list[str]) -> str:
        index_var = item_var = None
        if ":=" in tokens:
            names = [t for t in tokens[: tokens.index(":=")] if t != ","]
            if not 1 <= len(names) <= 2 or not all(n.startswith("$") for n in names):
                raise TemplateError("unsupported range variables")
            if len(names) == 2:
                index_var, item_var = names
            else:
                item_var = names[0]
            tokens = tokens[tokens.index(":=") + 1:]
        seq = self.expr(tokens)
        self.loops += 1
        item = f"item{self.loops}"
        self.scopes.append(_Scope(item, "range"))
        tags = [f"for {item} in {seq}"]
        if index_var:
            tags.append(f"set vars.v_{index_var[1:]} = loop.index0")
        if item_var:
            tags.append(f"set vars.v_{item_var[1:]} = {item}")
        return tags

    # -- whole template -------------------------------------------------------------------

    def translate(self, source: str) -> str:
        out = []
        last = 0
        for m in ACTION.finditer(source):
            out.append(_literal(source[last:m.start()]))
            last = m.end()
            # Go keeps all text but what `{{-`/`-}}` trim; transformers renders with
            # trim_blocks and lstrip_blocks, which `{%+`/`+%}` turn off tag by tag.
            left, right = ("-" if m.group(1) else "+"), ("-" if m.group(3) else "+")
            body = m.group(2)
            if "{{" in body:
                raise TemplateError("nested '{{' in a template action")
            kind, text = self.action(body)
            if kind == "output":
                out.append(f"{{{{{left.strip('+')} {text} {right.strip('+')}}}}}")
            elif kind == "tag":
                out.append(f"{{%{left} {text} {right}%}}")
            elif kind == "range":  # the for tag, then its variables; trims stay at the ends
                marks = [left] + ["+"] * (len(text) - 1)
                ends = ["+"] * (len(text) - 1) + [right]
                out.extend(f"{{%{a} {t} {b}%}}" for a, t, b in zip(marks, text, ends))
            else:  # a comment: nothing, but its trim markers still trim
                out.append(f"{{%{left} if false {right}%}}{{%+ endif +%}}")
        out.append(_literal(source[last:]))
        if source.endswith("\n"):  # Jinja drops a template's final newline; Go keeps it
            out.append("{{ '' }}")
        if len(self.scopes) != 1:
            raise TemplateError(f"unclosed {{{{ {self.scopes[-1].kind} }}}} in template")
        if "}}" in _strip_actions(source) or "{{" in _strip_actions(source):
            raise TemplateError("unbalanced '{{' or '}}' in template")
        return "".join(out)


def _strip_actions(source: str) -> str:
    return ACTION.sub("", source)


def _literal(text: str) -> str:
    """Literal template text, escaped so Jinja copies it as it is."""
    if not any(s in text for s in ("{{", "{%", "{#", "}}", "%}", "#}")):
        return text
    return "{% raw %}" + text + "{% endraw %}"


# Ollama's .System is the system messages joined; .Messages keeps them, as in Ollama. Go's
# $variables live in a namespace: Jinja's plain `set` would not outlive a loop iteration.
PRELUDE = (
    "{%- set vars = namespace() -%}"
    "{%- set ns = namespace(system='') -%}"
    "{%- for m in messages if m.role == 'system' -%}"
    "{%- set ns.system = ns.system + ('\\n\\n' if ns.system else '') + m.content -%}"
    "{%- endfor -%}"
    "{%- set system = ns.system -%}"
    "{%- set prompt = '' -%}{%- set response = '' -%}"
    "{%- set tools = tools or [] +%}"
)


GO_ACTION = re.compile(r"\{\{-?\s*(\.|\$|/\*|(if|range|with|end|else|template|define|block)\b"
                       r"|(json|len|eq|ne|and|or|not|slice|index|printf)\s)")


def is_jinja(source: str) -> bool:
    """A template written in Jinja already (a chat template pasted as TEMPLATE), not Go."""
    return ("{%" in source or "messages" in source) and not GO_ACTION.search(source)


def to_jinja(source: str) -> str:
    """The Jinja chat template equivalent to the Go template `source` (TemplateError if none).

    A Jinja template is kept as it is, once it compiles."""
    if not isinstance(source, str):
        raise TemplateError("template must be a string")
    if is_jinja(source):
        import jinja2

        try:
            jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(source)
        except jinja2.TemplateSyntaxError as e:
            raise TemplateError(f"Jinja syntax error on line {e.lineno}: {e.message}") from None
        return source
    if ".Messages" in source:
        return PRELUDE + Translator().translate(source)
    return _legacy(source)


def _legacy(source: str) -> str:
    """`.System`/`.Prompt`/`.Response` templates: one rendering per user turn."""
    # Split at a top-level {{ .Response }}: what follows closes a finished turn only.
    depth, split = 0, None
    for m in ACTION.finditer(source):
        head = (m.group(2).strip().split() or [""])[0]
        if head in ("if", "range", "with"):
            depth += 1
        elif head == "end":
            depth -= 1
        elif m.group(2).strip() == ".Response":
            if depth:
                raise TemplateError("{{ .Response }} inside {{ if }}/{{ range }} is not supported")
            split = m
            break
    head_src = source[: split.start()] if split else source
    tail_src = source[split.end():] if split else ""
    head = Translator().translate(head_src)
    tail = Translator().translate(tail_src) if tail_src else ""
    response = "{{ response }}"
    if split:
        response = f"{{{{{'-' if split.group(1) else ''} response {'-' if split.group(3) else ''}}}}}"
    return (
        PRELUDE
        + "{%- set turns = namespace(items=[], prompt=none) -%}"
        "{%- for m in messages -%}"
        "{%- if m.role == 'user' -%}"
        "{%- if turns.prompt is not none -%}"
        "{%- set turns.items = turns.items + [[turns.prompt, '']] -%}{%- endif -%}"
        "{%- set turns.prompt = m.content -%}"
        "{%- elif m.role == 'assistant' -%}"
        "{%- set turns.items = turns.items + [[turns.prompt or '', m.content or '']] -%}"
        "{%- set turns.prompt = none -%}"
        "{%- endif -%}{%- endfor -%}"
        "{%- set turns.items = turns.items + [[turns.prompt or '', none]] "
        "if turns.prompt is not none or add_generation_prompt else turns.items -%}"
        "{%- set first_system = system -%}"
        "{%- for turn in turns.items -%}"
        "{%- set system = first_system if loop.first else '' -%}"
        "{%- set prompt = turn[0] -%}"
        "{%- set response = turn[1] or '' +%}"
        + head
        + response
        + ("{%+ if turn[1] is not none +%}" + tail + "{%+ endif +%}" if tail else "")
        + "{%+ endfor -%}"
    )
