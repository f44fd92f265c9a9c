"""The official OpenAI Python SDK (pinned) talks to `sigil demo-model` through a real
`sigil proxy` in agent mode: SVID mTLS, certificate-bound tokens, Cedar policy, a filtered
model list, and refusals in the OpenAI error shape that the SDK turns into its own exceptions.
"""
import time

import httpx
import openai
import pytest

from conftest import TD, Agent, Proxy, Sigil, Workload, demo_model, register

POLICY = """
@id("floor-defect-detector")
permit (
  principal in Group::"factory-floor",
  action == Action::"invoke",
  resource == Model::"defect-detector"
)
when { context.scopes.contains("model:invoke") };

@id("anyone-lists-models")
permit (principal, action == Action::"list_models", resource);
"""

CAMERA = f"spiffe://{TD}/floor/camera"


class Stack:
    def __init__(self, root):
        self.server = Sigil(root)
        self.parts = []
        try:
            self.agent = Agent(self.server, root)
            self.parts.append(self.agent)
            register(self.server, self.agent, "proxy", dns=["localhost"], enforcer=True)
            register(self.server, self.agent, "floor/camera", groups=["factory-floor"],
                     scopes=["model:invoke"])
            register(self.server, self.agent, "office/assistant", groups=["office"],
                     scopes=["model:invoke"])
            self.model = demo_model(self.server, root)
            self.parts.append(self.model)
            self.proxy = Proxy(self.server, self.agent, root, self.model.url, POLICY)
            self.parts.append(self.proxy)
            self.camera = Workload(self.server, self.agent, root, CAMERA)
            self.office = Workload(self.server, self.agent, root, f"spiffe://{TD}/office/assistant")
            self.proxy.wait_ready(self.camera.ctx)
        except BaseException:
            self.stop()
            raise

    def client(self, who: Workload, token=None) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.proxy.url}/v1",
                             api_key=token if token is not None else who.token(),
                             http_client=httpx.Client(verify=who.ctx, timeout=20),
                             max_retries=0)

    def stop(self):
        for p in reversed(self.parts):
            p.stop()
        self.server.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = Stack(tmp_path_factory.mktemp("proxy-openai"))
    yield s
    s.stop()


def user(text):
    return [{"role": "system", "content": "You inspect parts on line 3."},
            {"role": "user", "content": text}]


def test_chat_completion_through_the_proxy(stack):
    with stack.client(stack.camera) as client:
        r = client.chat.completions.create(model="defect-detector",
                                           messages=user("inspect frame 7"))
    assert r.object == "chat.completion"
    assert r.model == "defect-detector"
    assert r.choices[0].finish_reason == "stop"
    text = r.choices[0].message.content
    assert "inspect frame 7" in text, text
    # The upstream saw the identity the proxy verified (mTLS + bound token), set by the proxy.
    assert CAMERA in text, text
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens > 0


def test_streamed_chat_completion_arrives_chunk_by_chunk(stack):
    with stack.client(stack.camera) as client:
        whole = client.chat.completions.create(model="defect-detector",
                                               messages=user("count the bolts"))
        started = time.monotonic()
        arrivals, pieces, finish = [], [], []
        stream = client.chat.completions.create(model="defect-detector",
                                                messages=user("count the bolts"), stream=True)
        with stream:
            for chunk in stream:
                assert chunk.object == "chat.completion.chunk"
                for c in chunk.choices:
                    if c.delta.content:
                        pieces.append(c.delta.content)
                        arrivals.append(time.monotonic() - started)
                    if c.finish_reason:
                        finish.append(c.finish_reason)
        total = time.monotonic() - started
    assert "".join(pieces) == whole.choices[0].message.content
    assert len(pieces) >= 5, pieces
    assert finish == ["stop"]
    # The model pauses 20 ms between chunks; a proxy that buffered would deliver them together.
    assert arrivals[-1] - arrivals[0] >= 0.02 * (len(pieces) - 2), (arrivals, total)


def test_completions_and_embeddings_pass(stack):
    with stack.client(stack.camera) as client:
        c = client.completions.create(model="defect-detector", prompt="frame 9")
        assert "frame 9" in c.choices[0].text
        # The SDK asks for base64 and decodes it.
        e = client.embeddings.create(model="defect-detector", input=["bolt", "nut"])
    assert [d.index for d in e.data] == [0, 1]
    assert len(e.data[0].embedding) == 16
    assert e.data[0].embedding != e.data[1].embedding


def test_model_list_is_filtered_to_what_the_caller_may_invoke(stack):
    with stack.client(stack.camera) as client:
        assert [m.id for m in client.models.list()] == ["defect-detector"]
    with stack.client(stack.office) as client:
        assert [m.id for m in client.models.list()] == []


def assert_openai_error(e):
    body = e.body
    assert isinstance(body, dict), body
    assert isinstance(body.get("message"), str) and body["message"], body
    assert isinstance(body.get("type"), str), body
    assert e.response.headers["content-type"].startswith("application/json")


def test_a_model_the_policy_does_not_permit_is_refused(stack):
    with stack.client(stack.camera) as client:
        with pytest.raises(openai.PermissionDeniedError) as e:
            client.chat.completions.create(model="forecast", messages=user("next shift?"))
        assert e.value.status_code == 403
        assert_openai_error(e.value)
        with pytest.raises(openai.PermissionDeniedError):
            client.chat.completions.create(model="forecast", messages=user("x"), stream=True)
    denied = [r for r in stack.proxy.audit()
              if r["decision"] == "deny" and r["spiffe_id"] == CAMERA
              and any(c.get("resource_id") == "forecast" for c in r.get("calls", []))]
    assert denied, stack.proxy.audit()


def test_another_group_is_refused_the_model(stack):
    with stack.client(stack.office) as client:
        with pytest.raises(openai.PermissionDeniedError) as e:
            client.chat.completions.create(model="defect-detector", messages=user("hello"))
    assert e.value.status_code == 403
    assert_openai_error(e.value)


def test_a_wrong_token_is_an_authentication_error(stack):
    for token in ["not-a-token", stack.office.token(), stack.camera.token(resource="other")]:
        # Garbage; a valid token bound to another certificate; one for another audience.
        with stack.client(stack.camera, token=token) as client:
            with pytest.raises(openai.AuthenticationError) as e:
                client.chat.completions.create(model="defect-detector", messages=user("hi"))
        assert e.value.status_code == 401
        assert_openai_error(e.value)
