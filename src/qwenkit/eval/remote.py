"""An evaluation backend over a running `qwenkit serve` (or any server with the same OpenAI-style
/v1/completions): prompts go as token ids, so the server sees exactly the tokens a local run would.

- next-token log-probabilities: each prompt with the candidate token appended, scored with `echo`,
  `max_tokens` 0 and `logprobs` 0; the candidate's log-probability is the last token's;
- generation: token-id prompts with `max_tokens`, `temperature` and `stop`; the text is cut again
  here at every stop string and end-of-text marker (the server takes at most 4 stop strings);
- scoring: `echo` with `max_tokens` 0 returns every prompt token's log-probability.
"""

from __future__ import annotations

from typing import Any

import httpx

from qwenkit.errors import QwenkitError
from qwenkit.eval.base import Backend, stop_token_ids
from qwenkit.tokenizer import Tokenizer

MAX_PROMPTS_PER_REQUEST = 1024  # qwenkit serve's limit on prompts in one /v1/completions request
MAX_STOP_STRINGS = 4  # OpenAI's (and qwenkit serve's) limit on stop strings per request


def api_root(base_url: str) -> str:
    """The server's /v1 URL from what a user types: `http://host:8000`, `.../v1` or `.../v1/completions`."""
    url = base_url.rstrip("/")
    for tail in ("/completions", "/chat/completions"):
        if url.endswith("/v1" + tail):
            url = url[: -len(tail)]
    return url if url.endswith("/v1") else url + "/v1"


class ApiBackend(Backend):
    """Runs evaluation prompts through a server's /v1/completions, `batch_size` prompts per request."""

    def __init__(
        self,
        base_url: str,
        tokenizer: Tokenizer,
        api_key: str | None = None,
        model: str | None = None,
        batch_size: int = 16,
        timeout: float = 600.0,
    ) -> None:
        self.url = api_root(base_url)
        self.tokenizer = tokenizer
        self.batch_size = max(1, batch_size)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(headers=headers, timeout=httpx.Timeout(timeout, connect=10.0))
        models = self._request("GET", "/models")["data"]
        if not models:
            raise QwenkitError(f"the server at {self.url} serves no model")
        chosen = next((m for m in models if m.get("id") == model), None) if model else models[0]
        if chosen is None:
            names = ", ".join(str(m.get("id")) for m in models)
            raise QwenkitError(f"the server at {self.url} has no model {model!r}; it serves: {names}")
        self.name = chosen["id"]
        self.context_length = int(chosen.get("max_model_len") or 0)
        self.end_texts = [tokenizer.decode([i]) for i in stop_token_ids(tokenizer)]

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        url = self.url + path
        try:
            response = self.client.request(method, url, json=body)
        except httpx.TimeoutException:
            raise QwenkitError(f"the server at {url} did not answer in time") from None
        except httpx.HTTPError as e:
            raise QwenkitError(f"cannot reach the server at {url}: {e}") from None
        if response.status_code >= 400:
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text[:300]
            raise QwenkitError(f"the server at {url} answered {response.status_code}: {message}")
        try:
            return response.json()
        except ValueError:
            raise QwenkitError(f"the server at {url} answered with something that is not JSON") from None

    def _completions(self, prompts: list[list[int]], **options) -> list[dict[str, Any]]:
        """The choices of one /v1/completions request, in prompt order."""
        body = {"model": self.name, "prompt": prompts, **options}
        choices = sorted(self._request("POST", "/completions", body)["choices"], key=lambda c: c["index"])
        if len(choices) != len(prompts):
            raise QwenkitError(
                f"the server at {self.url} answered {len(choices)} choices for {len(prompts)} prompts"
            )
        return choices

    def _echo_logprobs(self, prompts: list[list[int]]) -> list[list[float | None]]:
        """Every prompt token's log-probability (None for the first), MAX_PROMPTS_PER_REQUEST at a time."""
        results = []
        for start in range(0, len(prompts), MAX_PROMPTS_PER_REQUEST):
            part = prompts[start : start + MAX_PROMPTS_PER_REQUEST]
            for prompt, choice in zip(
                part, self._completions(part, echo=True, max_tokens=0, logprobs=0), strict=True
            ):
                values = (choice.get("logprobs") or {}).get("token_logprobs")
                if values is None or len(values) != len(prompt):
                    raise QwenkitError(
                        f"the server at {self.url} did not return the prompt's log-probabilities"
                    )
                results.append(values)
        return results

    def next_token_logprobs(self, prompts, candidates):
        candidates = list(candidates)
        per_request = max(1, min(self.batch_size, MAX_PROMPTS_PER_REQUEST // max(1, len(candidates))))
        results: list[list[float]] = []
        for start in range(0, len(prompts), per_request):
            rows = [list(p) + [c] for p in prompts[start : start + per_request] for c in candidates]
            last = [values[-1] for values in self._echo_logprobs(rows)]
            results += [last[k : k + len(candidates)] for k in range(0, len(last), len(candidates))]
        return results

    def generate(self, prompts, max_new_tokens, stop=(), temperature=0.0, seed=0):
        results = [""] * len(prompts)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # as LocalBackend batches
        cuts = [s for s in stop if s] + self.end_texts
        for k, start in enumerate(range(0, len(order), self.batch_size)):
            batch = order[start : start + self.batch_size]
            rows = [list(prompts[i]) for i in batch]
            budget = max_new_tokens
            if self.context_length:  # one budget per batch, cut where the longest prompt meets the window
                budget = min(budget, self.context_length - max(len(r) for r in rows))
            if budget < 1:
                continue
            options: dict[str, Any] = {"max_tokens": budget, "temperature": temperature}
            if stop:
                options["stop"] = list(stop)[:MAX_STOP_STRINGS]
            if temperature > 0:
                options["seed"] = seed + k
            for i, choice in zip(batch, self._completions(rows, **options), strict=True):
                text = choice["text"]
                for cut in cuts:
                    text = text.split(cut, 1)[0]
                results[i] = text
        return results

    def score(self, prompts):
        return self._echo_logprobs([list(p) for p in prompts])

    def close(self) -> None:
        self.client.close()
