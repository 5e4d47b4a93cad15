"""What `start` proves on the launching machine before anything is provisioned.

A wrong endpoint, a missing or read-only bucket, a store that ignores
conditional create, or an HF_TOKEN that cannot read the tokenizer repo would
otherwise be found by the nodes, after the GPUs were provisioned, as exits that
the managed job turns into recoveries (a wrong S3 endpoint: six in five
minutes). Each check is a round trip or two under the store's BRIEF retry
policy, and a failure is one line saying what is wrong and what to do.

The checks use the launching machine's credentials (the ones `status` reads
with, and the ones forwarded to the nodes when set: launch.skypilot.store_credentials).
Nodes that use an instance role instead are not covered.
"""

from __future__ import annotations

import os
import threading
from typing import Iterator, Mapping

from supervisor import DIST
from supervisor.errors import SuperviseError, first_line

HUB_TIMEOUT_S = 20.0  # huggingface_hub's client has no timeout (utils/_http.py, default_client_factory)


class PreflightError(SuperviseError):
    """A check before provisioning failed; nothing was launched (exit 2)."""


def check_scheme(url: str) -> None:
    """The launching machine must open the bucket's scheme: the launch event, `status`
    and the preflight read the bucket from here. fsspec's registry knows which package
    each scheme needs (`fsspec.get_filesystem_class` raises ImportError naming it)."""
    import fsspec
    from fsspec.registry import known_implementations

    protocol = url.split("://", 1)[0]
    try:
        fsspec.get_filesystem_class(protocol)
    except ImportError as err:
        package = known_implementations[protocol]["class"].split(".", 1)[0]
        raise PreflightError(f"{protocol}:// buckets need {package} on this machine ({err}): "
                             f"pip install '{DIST}[cloud]' (or pip install {package})") from None


def check_bucket(url: str) -> str:
    """The bucket exists, and this machine can create objects in it with the conditional
    create the commit protocol needs (the catalog's own canary, Catalog.prove_conditional_create)."""
    from supervisor.store import retry
    from supervisor.store.catalog import Catalog

    catalog = Catalog(url, retry.BRIEF)
    try:
        catalog.store.check_container()
        catalog.prove_conditional_create()
    except SuperviseError as err:
        raise PreflightError(f"checkpoints bucket: {err}; nothing was launched") from None
    return f"{url}: reachable, writable, conditional create enforced"


def hub_token(spec, environ: Mapping[str, str]) -> str | None:
    """The token the job's `hf download` gets: HF_TOKEN from this shell, when it is one of the job's secrets."""
    return (environ.get("HF_TOKEN") or None) if "HF_TOKEN" in spec.secrets else None


def hub_endpoint(spec) -> str:
    """The Hub the job's `hf download` asks: the job's HF_ENDPOINT, else huggingface_hub's
    own default (HF_ENDPOINT of this shell, else https://huggingface.co)."""
    from huggingface_hub import constants

    return (spec.envs.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def check_tokenizer(spec, environ: Mapping[str, str] = os.environ) -> str | None:
    """The job's token can read `tokenizer.hf_repo`, asked through the Hub API
    (`HfApi.auth_check`, huggingface_hub >= 0.27: GatedRepoError for a gated repo
    without access, RepositoryNotFoundError for a missing or hidden one)."""
    repo = spec.tokenizer.hf_repo
    if not repo:
        return None
    from huggingface_hub import HfApi

    endpoint, token = hub_endpoint(spec), hub_token(spec, environ)
    outcome: dict[str, BaseException | None] = {}

    def ask() -> None:
        try:
            HfApi(endpoint=endpoint).auth_check(repo, token=token or False)
            outcome["error"] = None
        except Exception as err:  # noqa: BLE001 - explained below, in the caller's thread
            outcome["error"] = err

    asking = threading.Thread(target=ask, daemon=True, name="preflight-hub")
    asking.start()
    asking.join(HUB_TIMEOUT_S)
    if "error" not in outcome:
        raise PreflightError(f"the Hub at {endpoint} did not answer within {HUB_TIMEOUT_S:.0f} s (checking "
                             f"tokenizer.hf_repo {repo!r}); check HF_ENDPOINT and the network; nothing was launched")
    if outcome["error"] is not None:
        raise PreflightError(explain_hub_error(outcome["error"], repo, endpoint, token) + "; nothing was launched")
    return f"{repo}: readable at {endpoint}" + (" with HF_TOKEN" if token else " without a token")


def explain_hub_error(err: BaseException, repo: str, endpoint: str, token: str | None) -> str:
    """One line for what auth_check raised (huggingface_hub.utils._http.hf_raise_for_status)."""
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    page = f"{endpoint}/{repo}"
    if isinstance(err, GatedRepoError):
        if not token:
            return (f"tokenizer.hf_repo {repo!r} is gated and the job has no HF_TOKEN: export HF_TOKEN=<a token "
                    f"of an account with access> (request access at {page}) and keep HF_TOKEN in secrets")
        return (f"HF_TOKEN has no access to the gated tokenizer repo {repo!r}: request access at {page} with "
                "the account that owns the token, or export another HF_TOKEN")
    if isinstance(err, RepositoryNotFoundError):
        return (f"tokenizer.hf_repo {repo!r} was not found at {endpoint} (or is private and "
                f"{'HF_TOKEN cannot see it' if token else 'the job has no HF_TOKEN'}); check the repo id and HF_TOKEN")
    response = getattr(err, "response", None)
    if isinstance(err, HfHubHTTPError) and response is not None and response.status_code == 401:
        return f"HF_TOKEN is not a valid token at {endpoint} (401); create one at {endpoint}/settings/tokens"
    return (f"cannot check tokenizer.hf_repo {repo!r} at {endpoint} ({type(err).__name__}: {first_line(err)}); "
            "check HF_ENDPOINT and the network")


def run(spec, environ: Mapping[str, str] = os.environ) -> Iterator[str]:
    """Every check before provisioning, in order: one line per check as it passes."""
    yield check_bucket(spec.checkpoints_url)
    tokenizer = check_tokenizer(spec, environ)
    if tokenizer:
        yield tokenizer
