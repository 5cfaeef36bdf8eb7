"""Constrained decoding: every generated answer follows the answer template, so every answer parses.

The template (`Product: {title}, Category: {category3_code}, Full Price: {full_price}`) becomes a small
character automaton: literal text must be written as is, a `category*` field is one of the known codes
(from the train split), a `*price*` field is a number (digits, optionally `.` and 1-2 decimals), and any
other field is free text of at least one character, without `:` or a newline (so no label can hide in it).
The automaton runs over the text each token adds (its "piece"), so the model keeps its own tokenization.

So that the answer also *finishes* within `max_new_tokens`, we precompute for every reachable state the
fewest tokens that still complete the answer (shortest path in the token automaton) and only allow a
token when enough steps are left after it. A random model therefore still writes a complete answer.
"""

from __future__ import annotations

import string
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor

from productvlm.errors import UserError
from productvlm.prompting.templates import template_fields

MAX_INT_DIGITS, MAX_DECIMALS = 7, 2
FREE_FORBIDDEN = set(":\n\r")  # a ':' in free text could read as a label to the parser
Item = tuple  # NFA item: ("lit", seg, offset) | ("free", seg, nonempty) | ("choice", seg, prefix)
#               | ("num", seg, int_digits, has_dot, decimals) | ("lead",) | ("end",)
State = frozenset


@dataclass(frozen=True)
class Segment:
    kind: str  # "lit" | "free" | "choice" | "num"
    text: str = ""  # literal text, or the field name
    options: tuple[str, ...] = ()


def field_kind(name: str) -> str:
    if name.startswith("category"):
        return "choice"
    return "num" if "price" in name else "free"


def compile_template(template: str, choices: dict[str, Sequence[str]]) -> list[Segment]:
    """Template -> segments; `choices[field]` are the allowed values of each `category*` field."""
    segments = []
    for literal, name, _, _ in string.Formatter().parse(template):
        if literal:
            segments.append(Segment("lit", literal))
        if name:
            kind = field_kind(name)
            options = tuple(sorted({str(o) for o in choices.get(name, ()) if str(o)}))
            if kind == "choice" and not options:
                raise UserError(f"constrained decoding: no known values for the template field {{{name}}}")
            segments.append(Segment(kind, name, options))
    if not segments:
        raise UserError("constrained decoding: the answer template is empty")
    return segments


class TemplateAutomaton:
    """A character-level NFA for the template; states are frozensets of items (dead = empty)."""

    def __init__(self, segments: list[Segment]):
        self.segments = segments
        self.start: State = self.closure({("lead",), self._begin(0)})
        self._step: dict[tuple[State, str], State] = {}

    def _begin(self, seg: int) -> Item:
        if seg >= len(self.segments):
            return ("end",)
        kind = self.segments[seg].kind
        return {"lit": ("lit", seg, 0), "free": ("free", seg, False), "choice": ("choice", seg, "")}.get(
            kind, ("num", seg, 0, False, 0)
        )

    def _complete(self, item: Item) -> bool:
        kind = item[0]
        if kind == "lit":
            return item[2] == len(self.segments[item[1]].text)
        if kind == "free":
            return item[2]
        if kind == "choice":
            return item[2] in self.segments[item[1]].options
        if kind == "num":
            return item[2] > 0 and (not item[3] or item[4] > 0)
        return False

    def closure(self, items: Iterable[Item]) -> State:
        out, todo = set(), list(items)
        while todo:
            item = todo.pop()
            if item in out:
                continue
            out.add(item)
            if item[0] not in ("lead", "end") and self._complete(item):
                todo.append(self._begin(item[1] + 1))
        return frozenset(out)

    def _advance(self, item: Item, c: str) -> Item | None:
        kind = item[0]
        if kind == "lead":
            return self._begin(0) if c == " " else None
        if kind == "lit":
            text = self.segments[item[1]].text
            return ("lit", item[1], item[2] + 1) if item[2] < len(text) and text[item[2]] == c else None
        if kind == "free":
            if c in FREE_FORBIDDEN or (not item[2] and (c.isspace() or c in ",;")):
                return None
            return ("free", item[1], True)
        if kind == "choice":
            prefix = item[2] + c
            return (
                ("choice", item[1], prefix)
                if any(o.startswith(prefix) for o in self.segments[item[1]].options)
                else None
            )
        if kind == "num":
            _, seg, ints, dot, decimals = item
            if c.isdigit() and c.isascii():
                if not dot and ints < MAX_INT_DIGITS:
                    return ("num", seg, ints + 1, False, 0)
                if dot and decimals < MAX_DECIMALS:
                    return ("num", seg, ints, True, decimals + 1)
            if c == "." and ints > 0 and not dot:
                return ("num", seg, ints, True, 0)
        return None

    def step(self, state: State, c: str) -> State:
        key = (state, c)
        if key not in self._step:
            nxt = (self._advance(item, c) for item in state)
            self._step[key] = self.closure(i for i in nxt if i is not None)
        return self._step[key]

    def feed(self, state: State, text: str) -> State:
        for c in text:
            state = self.step(state, c)
            if not state:
                break
        return state

    @staticmethod
    def accepting(state: State) -> bool:
        return ("end",) in state


def token_pieces(tokenizer) -> list[str | None]:
    """The text each token id adds when appended to an answer; None for special, empty or partial-byte tokens.

    Decoding `[anchor, id]` and dropping the anchor's text keeps the leading space of `▁word` pieces,
    which decoding `[id]` alone would strip.
    """
    anchor = tokenizer.convert_tokens_to_ids("a")
    if anchor is None or anchor == tokenizer.unk_token_id:
        anchor = tokenizer("a", add_special_tokens=False).input_ids[-1]
    head = tokenizer.decode([anchor])
    n = len(tokenizer)
    texts = tokenizer.batch_decode([[anchor, i] for i in range(n)], skip_special_tokens=True)
    special = set(tokenizer.all_special_ids) | {
        i for i, t in tokenizer.added_tokens_decoder.items() if getattr(t, "special", False)
    }
    pieces: list[str | None] = []
    for i, text in enumerate(texts):
        piece = text[len(head) :] if text.startswith(head) else None
        pieces.append(None if i in special or not piece or "\ufffd" in piece else piece)
    return pieces


class AnswerConstraint:
    """The template automaton lifted to tokens, with the fewest tokens left to finish from each state.

    Built once per (tokenizer, template, categories, max_new_tokens); `logits_processor()` makes a fresh
    stateful processor for each `generate` call.
    """

    def __init__(
        self,
        tokenizer,
        template: str,
        choices: dict[str, Sequence[str]],
        eos_token_ids: Sequence[int],
        max_new_tokens: int,
    ):
        self.automaton = TemplateAutomaton(compile_template(template, choices))
        self.eos = [int(i) for i in eos_token_ids]
        self.max_new_tokens = max_new_tokens
        pieces = token_pieces(tokenizer)
        for i in self.eos:  # an end id whose text looks plain (the official </s>) must not sit inside a field
            if i < len(pieces):
                pieces[i] = None
        self._by_first: dict[str, list[tuple[int, str]]] = {}
        for i, piece in enumerate(pieces):
            if piece is not None:
                self._by_first.setdefault(piece[0], []).append((i, piece))
        self._explore()
        if self.need[self.automaton.start] > max_new_tokens:
            raise UserError(
                f"constrained decoding: max_new_tokens={max_new_tokens} is too few for the answer template "
                f"(the shortest complete answer takes {self.need[self.automaton.start]} tokens)"
            )

    def _transitions(self, state: State) -> dict[int, State]:
        """Token id -> next state, for the tokens allowed in `state` (end tokens excluded)."""
        out = {}
        for first, group in self._by_first.items():
            if not self.automaton.step(state, first):
                continue
            for i, piece in group:
                nxt = self.automaton.feed(state, piece)
                if nxt:
                    out[i] = nxt
        return out

    def _explore(self) -> None:
        """All states reachable from the start, their transitions, and the fewest tokens to finish."""
        start = self.automaton.start
        self.trans: dict[State, dict[int, State]] = {}
        todo = deque([start])
        while todo:
            state = todo.popleft()
            if state in self.trans:
                continue
            self.trans[state] = self._transitions(state)
            todo.extend(s for s in set(self.trans[state].values()) if s not in self.trans)
        parents: dict[State, set[State]] = {s: set() for s in self.trans}
        for state, nexts in self.trans.items():
            for nxt in set(nexts.values()):
                parents[nxt].add(state)
        # need = tokens still to write, counting the end token; BFS backwards from the accepting states
        self.need = {s: 1 for s in self.trans if self.automaton.accepting(s)}
        queue = deque(self.need)
        while queue:
            state = queue.popleft()
            for parent in parents[state]:
                if parent not in self.need:
                    self.need[parent] = self.need[state] + 1
                    queue.append(parent)
        self._vectors: dict[State, torch.Tensor] = {}

    def need_after(self, state: State, vocab_size: int) -> torch.Tensor:
        """Per token id: tokens still needed after choosing it (0 for an allowed end token, large if banned)."""
        if state not in self._vectors:
            vec = torch.full((vocab_size,), 1 << 30, dtype=torch.long)
            for i, nxt in self.trans[state].items():
                if nxt in self.need and i < vocab_size:
                    vec[i] = self.need[nxt]
            if self.automaton.accepting(state):
                vec[[i for i in self.eos if i < vocab_size]] = 0
            self._vectors[state] = vec
        return self._vectors[state]

    def logits_processor(self) -> TemplateLogitsProcessor:
        return TemplateLogitsProcessor(self)

    def accepts(self, text: str) -> bool:
        """Whether `text` (a decoded answer) is a complete answer of the template."""
        return self.automaton.accepting(self.automaton.feed(self.automaton.start, text))


class TemplateLogitsProcessor(LogitsProcessor):
    """Masks the tokens that would leave the template or could not finish it within max_new_tokens.

    One instance per `generate` call (it tracks each row's automaton state); greedy or sampling, no beams.
    """

    def __init__(self, constraint: AnswerConstraint):
        self.c = constraint
        self.prompt_len: int | None = None
        self.states: list[State | None] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.prompt_len is None:
            self.prompt_len = input_ids.shape[1]
            self.states = [self.c.automaton.start] * input_ids.shape[0]
        else:
            for row, token in enumerate(input_ids[:, -1].tolist()):
                state = self.states[row]
                self.states[row] = None if state is None else self.c.trans[state].get(token)  # None: finished
        left = self.c.max_new_tokens - (input_ids.shape[1] - self.prompt_len)
        masked = torch.full_like(scores, float("-inf"))
        for row, state in enumerate(self.states):
            if state is None:  # ended with an end token; generate() pads this row from now on
                masked[row] = scores[row]
                continue
            allowed = (self.c.need_after(state, scores.shape[1]) <= left - 1).to(scores.device)
            masked[row] = scores[row].masked_fill(~allowed, float("-inf"))
        return masked


def known_choices(template: str, train_rows: Sequence[dict]) -> dict[str, list[str]]:
    """The values of each `category*` template field seen in the train split."""
    return {
        f: sorted({str(r[f]) for r in train_rows if r.get(f) not in (None, "")})
        for f in template_fields(template)
        if field_kind(f) == "choice"
    }


__all__ = [
    "AnswerConstraint",
    "TemplateLogitsProcessor",
    "TemplateAutomaton",
    "compile_template",
    "known_choices",
]
