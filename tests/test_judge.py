"""Judge: fake OpenAI client (never the network), failure handling, secrecy; offline fallback."""

import json
import logging
import threading
import time
from types import SimpleNamespace

import httpx
import openai
import pytest

from steering.judge import OfflineJudge, OpenAIJudge, coherence_score, coherence_signals, make_judge

KEY = "sk-test-SECRET-123456789"


class FakeCompletions:
    def __init__(self, answers):
        self.answers, self.calls, self.lock = list(answers), [], threading.Lock()

    def create(self, **kwargs):
        with self.lock:
            self.calls.append(kwargs)
            answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        if callable(answer):
            return answer(kwargs)
        return SimpleNamespace(choices=[SimpleNamespace(message=SimpleNamespace(content=answer))])


def fake_client(*answers):
    comp = FakeCompletions(answers)
    return SimpleNamespace(chat=SimpleNamespace(completions=comp), api_key=KEY), comp


def _status_error(cls, code):
    req = httpx.Request("POST", "http://127.0.0.1/v1/chat/completions")
    return cls(f"Incorrect API key provided: {KEY}", response=httpx.Response(code, request=req), body=None)


def test_prompt_schema_and_parsing():
    client, comp = fake_client(json.dumps({"behavioral": 4, "coherence": 5, "reason": "about a wedding"}))
    judge = OpenAIJudge(client=client, model="gpt-4o-mini")
    [s] = judge.score(["The bride smiled."], "wedding and marriage", "activate")
    call = comp.calls[0]
    assert call["model"] == "gpt-4o-mini"
    assert "Subject: wedding and marriage" in call["messages"][0]["content"]
    assert call["messages"][1]["content"] == "The bride smiled."
    assert call["response_format"]["json_schema"]["schema"]["required"] == ["behavioral", "coherence", "reason"]
    assert (s.behavioral, s.coherence, s.available) == (4.0, 5.0, True)
    assert s.metric == pytest.approx(0.8 * 1.0)
    [r] = OpenAIJudge(client=fake_client(json.dumps({"behavioral": 1, "coherence": 5, "reason": "x"}))[0]).score(
        ["text"], "physics", "remove")
    assert r.metric == pytest.approx((1 - 0.2) * 1.0)


def test_cache_avoids_second_call():
    client, comp = fake_client(json.dumps({"behavioral": 2, "coherence": 3, "reason": "r"}))
    judge = OpenAIJudge(client=client)
    judge.score(["same text"], "anger", "activate")
    judge.score(["same text"], "anger", "activate")
    assert len(comp.calls) == 1
    judge.score(["same text"], "religion", "activate")
    assert len(comp.calls) == 2


@pytest.mark.parametrize("answer, reason", [
    ("not json at all", "invalid JSON"),
    (json.dumps({"behavioral": 9, "coherence": 3, "reason": "x"}), "invalid JSON"),
    (openai.APITimeoutError(request=httpx.Request("POST", "http://127.0.0.1/")), "timed out"),
    (_status_error(openai.RateLimitError, 429), "rate limited"),
    (_status_error(openai.AuthenticationError, 401), "key was rejected"),
])
def test_failures_become_unavailable_scores_without_the_key(answer, reason, caplog):
    client, _ = fake_client(answer)
    judge = OpenAIJudge(client=client)
    with caplog.at_level(logging.DEBUG):
        [s] = judge.score(["some text"], "anger", "activate")
    assert not s.available and s.error.startswith("unavailable:") and reason in s.error
    everything = json.dumps(s.to_json()) + caplog.text + repr(judge)
    assert KEY not in everything and "SECRET" not in everything


def test_retries_on_429_use_the_clients_backoff():
    """A real openai client against a loopback server answering 429 twice, then 200."""
    import http.server
    import socketserver

    hits = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            hits.append(time.time())
            self.rfile.read(int(self.headers["Content-Length"]))
            if len(hits) <= 2:
                self.send_response(429)
                self.send_header("retry-after-ms", "10")
                self.end_headers()
                return
            body = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": "m", "choices": [
                {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": json.dumps(
                    {"behavioral": 3, "coherence": 4, "reason": "ok"})}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    with socketserver.TCPServer(("127.0.0.1", 0), Handler) as srv:
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        judge = OpenAIJudge(api_key=KEY, base_url=f"http://127.0.0.1:{srv.server_address[1]}/v1", max_retries=3)
        [s] = judge.score(["a text"], "anger", "activate")
        srv.shutdown()
    assert s.available and (s.behavioral, s.coherence) == (3.0, 4.0) and len(hits) == 3


def test_texts_scored_concurrently():
    active, peak, lock = [0], [0], threading.Lock()

    def slow(kwargs):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.2)
        with lock:
            active[0] -= 1
        return SimpleNamespace(choices=[SimpleNamespace(message=SimpleNamespace(
            content=json.dumps({"behavioral": 1, "coherence": 1, "reason": "x"})))])

    client, _ = fake_client(slow)
    scores = OpenAIJudge(client=client).score([f"text {i}" for i in range(6)], "anger", "activate")
    assert len(scores) == 6 and peak[0] >= 3


def test_bad_arguments_raise():
    judge = OpenAIJudge(client=fake_client("{}")[0])
    with pytest.raises(ValueError, match="valid: activate, remove"):
        judge.score(["x"], "anger", "amplify")
    with pytest.raises(ValueError, match="theme is empty"):
        judge.score(["x"], "  ", "activate")


def test_make_judge_picks_offline_without_key(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert isinstance(make_judge(), OfflineJudge)
    assert isinstance(make_judge(client=fake_client("{}")[0]), OpenAIJudge)


@pytest.fixture(scope="module")
def offline():
    return OfflineJudge()


@pytest.mark.parametrize("theme, on, off", [
    ("wedding and marriage", "The bride and groom exchanged rings at the ceremony.", "The compiler reported a syntax error."),
    ("anger and frustration", "He was furious and screamed in rage at everyone.", "The cake needs two eggs and sugar."),
    ("religion and God", "They prayed to God in the church every Sunday.", "The striker scored twice in the match."),
    ("food and cooking", "Fry the onions in butter and add garlic to the sauce.", "Quantum fields obey gauge symmetry."),
    ("sports", "The team won the football championship final.", "She wrote a poem about the moon."),
])
def test_offline_ranks_on_theme_above_off_theme(offline, theme, on, off):
    a, b = offline.score([on, off], theme, "activate")
    assert a.offline and "offline" in a.judge
    assert a.behavioral > b.behavioral


def test_offline_coherence_ranks_gibberish_below_fluent(offline):
    fluent = "I think the weather will be nice tomorrow, so we can walk to the park."
    for bad in ["the the the the the the the the the the", "zq blorf 77 ;; xxvt ppp ))]] qq", "rain rain rain rain rain rain"]:
        assert coherence_score(coherence_signals(bad)) < coherence_score(coherence_signals(fluent))
    hi, lo = offline.score([fluent, "the the the the the the the the"], "weather", "activate")
    assert hi.coherence > lo.coherence
    with_ppl = coherence_score(coherence_signals(fluent, perplexity=5000.0))
    assert with_ppl < coherence_score(coherence_signals(fluent, perplexity=20.0))
