"""ChatSession's history and cache reuse, and spac-run --interactive on the terminal."""

from __future__ import annotations

import io
import sys
import threading

import pytest

from spac.runtime import GenerationError, Runtime
from spac.runtime.chat import ChatSession, chat_prompt
from spac.runtime.cli import main

FAMILY = "qwen3_moe"


@pytest.fixture(scope="module")
def runtime(exported):
    with Runtime(exported(FAMILY).output, profile="cpu-only", draft_len=3) as runtime:
        yield runtime


def test_session_keeps_the_history_and_reuses_the_cache(runtime):
    session = ChatSession(runtime, system="Be brief.", max_new_tokens=6)
    first = session.send("Name a prime.")
    second = session.send("Another one.")
    assert [m["role"] for m in session.messages] == ["user", "assistant", "user", "assistant"]
    assert session.messages[1]["content"] == first.text and session.messages[3]["content"] == second.text
    first_prompt = chat_prompt(runtime.tokenizer, session.messages[:1], system="Be brief.")
    assert second.stats.decode.reused >= len(first_prompt)
    # The same conversation from scratch gives the same reply.
    again = runtime.generate(chat_prompt(runtime.tokenizer, session.messages[:3], system="Be brief."),
                             max_new_tokens=6)
    assert again.token_ids == second.token_ids


def test_a_turn_that_fails_leaves_the_history(runtime):
    session = ChatSession(runtime, max_new_tokens=4)
    session.send("Hello.")
    with pytest.raises(GenerationError, match="context"):
        session.send("word " * runtime.context)
    assert len(session.messages) == 2
    assert session.send("Still there?").token_ids


def test_interactive_command(exported, monkeypatch, capsys):
    package = str(exported(FAMILY).output)
    turns = "Hello.\n\n" + "long " * 400 + "\n/reset\nAgain.\n/exit\nnever read\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(turns))
    assert main(["--package", package, "--interactive", "--max-new-tokens", "5", "--system", "Be kind."]) == 0
    out, err = capsys.readouterr()
    assert out.count("> ") == 6  # Hello, the empty line, the long one, /reset, Again, /exit; nothing after it
    assert "[error]" in out and "context" in out
    assert err.count("[spac] ") == 2  # a stats line per answered turn


def test_prompt_or_interactive_is_required(exported, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--package", str(exported(FAMILY).output)])
    assert exit_.value.code == 2 and "--prompt is required" in capsys.readouterr().err


def test_sessions_in_two_threads_each_get_their_own_replies(runtime):
    # Switch threads as often as possible so one thread's generation starts the moment the
    # other's ends: a reply must still be read from its own generation, not the latest one.
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    turns = [f"Question {i}." for i in range(4)]
    sessions = {name: ChatSession(runtime, system=name, max_new_tokens=4) for name in ("One.", "Two.")}
    replies: dict[str, list] = {name: [] for name in sessions}

    def talk(name):
        for turn in turns:
            replies[name].append(sessions[name].send(turn))

    try:
        threads = [threading.Thread(target=talk, args=(name,)) for name in sessions]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(previous)
    for name, session in sessions.items():
        alone = ChatSession(runtime, system=name, max_new_tokens=4)
        for turn, reply in zip(turns, replies[name]):
            assert reply.token_ids == alone.send(turn).token_ids
        assert session.messages == alone.messages
