"""Read-only calls to the Kubernetes API for ``trainer watch``, through the official ``kubernetes`` client.

Every failure (no kubeconfig, an unknown context, an unreachable server, rejected credentials, no permission)
becomes one ``KubeError`` line that says what to check, never a traceback. Requests carry timeouts and the
client's bounded retries.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from trainer.errors import InputError, first_line

T = TypeVar("T")
TIMEOUT = (5.0, 30.0)  # connect, read (seconds) for every request but a followed log
FOLLOW_READ_TIMEOUT_S = 60.0  # a followed log with nothing new for this long is reopened by the caller


class KubeError(InputError):
    """The cluster could not be asked (configuration, connection, authentication or authorisation)."""


@dataclass
class Kube:
    """API handles for one cluster context."""

    core: Any  # kubernetes.client.CoreV1Api
    batch: Any  # kubernetes.client.BatchV1Api
    server: str
    context: str | None
    namespace: str | None = None  # the context's default namespace
    custom: Any = None  # kubernetes.client.CustomObjectsApi (JobSet, PyTorchJob)

    def _call(self, what: str, request: Callable[[], T]) -> T:
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            return request()
        except ApiException as exc:
            raise KubeError(_explain_status(exc.status, what, self.server, exc.reason)) from None
        except (HTTPError, OSError) as exc:
            cause = getattr(exc, "reason", None) or exc  # MaxRetryError: the last attempt's error
            text = first_line(cause).rsplit("): ", 1)[-1]
            raise KubeError(f"cannot reach the Kubernetes API at {self.server} ({what}): {text}") from None

    def pods(self, namespace: str, selector: str) -> list[Any]:
        return list(self._call(f"list pods in namespace {namespace}", lambda: self.core.list_namespaced_pod(
            namespace, label_selector=selector, _request_timeout=TIMEOUT)).items)

    def jobs(self, namespace: str, selector: str) -> list[Any]:
        return list(self._call(f"list jobs in namespace {namespace}", lambda: self.batch.list_namespaced_job(
            namespace, label_selector=selector, _request_timeout=TIMEOUT)).items)

    def custom_objects(self, group: str, version: str, plural: str, namespace: str,
                       selector: str) -> list[dict[str, Any]] | None:
        """Objects of a custom resource (a JobSet, a PyTorchJob) as the API's JSON; None when this cluster does not
        serve the kind (its CRD is not installed: 404) or this user may not list it (403), so that a release of
        another kind is still watched."""
        from kubernetes.client.exceptions import ApiException

        def request() -> dict[str, Any] | None:
            try:
                return self.custom.list_namespaced_custom_object(group, version, namespace, plural,
                                                                 label_selector=selector, _request_timeout=TIMEOUT)
            except ApiException as exc:
                if exc.status in (403, 404):
                    return None
                raise

        if self.custom is None:
            return None
        found = self._call(f"list {plural} in namespace {namespace}", request)
        return None if found is None else list(found.get("items") or [])

    def events(self, namespace: str, object_name: str) -> list[Any]:
        return list(self._call(f"list events of {object_name}", lambda: self.core.list_namespaced_event(
            namespace, field_selector=f"involvedObject.name={object_name}", _request_timeout=TIMEOUT)).items)

    def config_map(self, namespace: str, name: str) -> dict[str, str] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            found = self.core.read_namespaced_config_map(name, namespace, _request_timeout=TIMEOUT)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise KubeError(_explain_status(exc.status, f"read configmap {name}", self.server, exc.reason)) from None
        except OSError as exc:
            raise KubeError(f"cannot reach the Kubernetes API at {self.server}: {first_line(exc)}") from None
        return dict(found.data or {})

    def log_tail(self, namespace: str, pod: str, container: str, lines: int) -> str:
        """The last lines of a container's log, each prefixed with the kubelet's RFC 3339 timestamp."""
        response = self._call(f"read the log of {pod}", lambda: self.core.read_namespaced_pod_log(
            pod, namespace, container=container, tail_lines=lines, timestamps=True, _preload_content=False,
            _request_timeout=TIMEOUT))
        return bytes(response.data).decode("utf-8", errors="replace")

    def follow_log(self, namespace: str, pod: str, container: str, since_seconds: int | None = None) -> Iterator[str]:
        """A container's log as it grows (timestamped lines) until the container ends or the stream goes quiet."""
        response = self._call(f"follow the log of {pod}", lambda: self.core.read_namespaced_pod_log(
            pod, namespace, container=container, follow=True, timestamps=True, since_seconds=since_seconds,
            _preload_content=False, _request_timeout=(TIMEOUT[0], FOLLOW_READ_TIMEOUT_S)))
        pending = b""
        try:
            for chunk in response.stream(4096, decode_content=True):
                pending += chunk
                *complete, pending = pending.split(b"\n")
                for raw in complete:
                    yield raw.decode("utf-8", errors="replace")
            if pending:
                yield pending.decode("utf-8", errors="replace")
        except OSError:
            return  # the connection ended (pod gone, read timeout): the caller decides whether to reopen
        finally:
            response.release_conn()


def _explain_status(status: int | None, what: str, server: str, reason: str | None) -> str:
    if status == 401:
        return f"the Kubernetes API at {server} rejected the credentials (401) while trying to {what}: log in again"
    if status == 403:
        return f"no permission to {what} (403 Forbidden): ask for get/list/watch on pods, pods/log, jobs and events"
    if status == 404:
        return f"not found while trying to {what} (404): check the namespace (-n) and the release name"
    return f"the Kubernetes API at {server} answered {status} {reason or ''} while trying to {what}".strip()


def connect(context: str | None = None, kubeconfig: str | None = None) -> Kube:
    """Clients for a kubeconfig context (KUBECONFIG or ~/.kube/config), or the in-cluster service account."""
    import logging

    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    # urllib3 logs each retry as a warning; the one error below says it all
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)

    paths = [p for p in (kubeconfig or os.environ.get("KUBECONFIG", "")).split(os.pathsep) if p]
    existing = [p for p in paths if Path(p).expanduser().is_file()]
    path = os.pathsep.join(existing) if existing else None  # several files merge, as kubectl merges them
    if path is None and not paths:
        default = Path("~/.kube/config").expanduser()
        path = str(default) if default.is_file() else None
    namespace = None
    try:
        if path is not None:
            api = config.new_client_from_config(config_file=path, context=context, persist_config=False)
            contexts, active = config.list_kube_config_contexts(config_file=path)
            chosen = next((c for c in contexts if c.get("name") == context), active) if context else active
            namespace = ((chosen or {}).get("context") or {}).get("namespace")
        elif os.environ.get("KUBERNETES_SERVICE_HOST") and not paths and context is None:
            configuration = client.Configuration()
            config.load_incluster_config(client_configuration=configuration)
            api = client.ApiClient(configuration)
            service_account = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
            namespace = service_account.read_text().strip() if service_account.is_file() else None
        else:
            looked = ", ".join(paths) if paths else "~/.kube/config"
            raise KubeError(f"no kubeconfig found (looked at {looked}): pass --kubeconfig or set KUBECONFIG")
    except ConfigException as exc:
        raise KubeError(f"kubeconfig {path or '(in-cluster)'}: {first_line(exc)}") from None
    except (ValueError, TypeError, OSError) as exc:  # malformed kubeconfig contents
        raise KubeError(f"kubeconfig {path}: cannot be used: {first_line(exc)}") from None
    return Kube(client.CoreV1Api(api), client.BatchV1Api(api), api.configuration.host, context, namespace,
                client.CustomObjectsApi(api))
