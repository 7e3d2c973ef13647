"""Container resources and Dask's memory limit inside them.

Kubernetes quantities (``"4Gi"``, ``"500m"``) are parsed once here; a :class:`Resources`
checks itself (positive cpu, memory and ephemeral storage) and turns into the
``requests``/``limits`` block of a container. Requests equal limits: a Dask worker that
is promised less memory than it may use is the first pod the kubelet evicts.

:func:`dask_memory_limit` puts Dask's ``--memory-limit`` safely below the container's
memory limit. The nanny restarts a worker at 95 % of its memory limit and the kubelet
kills the container (OOMKilled, no clean restart, results lost) at 100 % of the
container's: with Dask's limit at 85 % of the container, the nanny acts first.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lazysky.errors import ParameterError

__all__ = [
    "DEFAULT_MEMORY_FRACTION",
    "MAX_MEMORY_FRACTION",
    "Resources",
    "dask_memory_limit",
    "parse_cpu",
    "parse_quantity_bytes",
]

#: Dask's memory limit as a fraction of the container's when none is given
DEFAULT_MEMORY_FRACTION = 0.85
#: the largest fraction of the container's memory limit Dask's limit may take
MAX_MEMORY_FRACTION = 0.90

_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {"k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18}
_QUANTITY = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*$")
_DASK_UNITS = {
    "": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40, "k": 10**3, "m": 10**6,
    "g": 10**9, "t": 10**12,
}


def parse_quantity_bytes(value: str | int, *, field: str = "memory") -> int:
    """Bytes in a Kubernetes memory/storage quantity (``"4Gi"``, ``"500M"``, ``1024``).

    Examples
    --------
    >>> parse_quantity_bytes("4Gi")
    4294967296
    >>> parse_quantity_bytes("1.5G")
    1500000000
    """
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    else:
        m = _QUANTITY.match(str(value))
        unit = m.group(2) if m else ""
        if m is None or (unit and unit not in _BINARY and unit not in _DECIMAL):
            msg = (
                f"{field}={value!r} is not a Kubernetes quantity; expected a number with "
                f"an optional suffix from {sorted(_BINARY)} or {sorted(_DECIMAL)}, "
                f"e.g. '4Gi'"
            )
            raise ParameterError(msg)
        n = int(float(m.group(1)) * _BINARY.get(unit, _DECIMAL.get(unit, 1)))
    if n <= 0:
        msg = f"{field}={value!r} must be positive"
        raise ParameterError(msg)
    return n


def parse_cpu(value: str | int | float, *, field: str = "cpu") -> float:
    """Cores in a Kubernetes cpu quantity (``"500m"`` → 0.5, ``"2"`` → 2.0).

    Examples
    --------
    >>> parse_cpu("250m")
    0.25
    """
    text = str(value).strip()
    m = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)(m?)", text)
    if m is None or float(m.group(1)) <= 0:
        msg = f"{field}={value!r} is not a positive cpu quantity; expected e.g. '2' or '500m'"
        raise ParameterError(msg)
    return float(m.group(1)) / (1000 if m.group(2) else 1)


def _dask_bytes(value: str | int, *, field: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    else:
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(value))
        if m is None or m.group(2).lower() not in _DASK_UNITS:
            msg = (
                f"{field}={value!r} is not a memory size; expected bytes or a size such "
                f"as '3GiB', '3.5GB' or '3Gi'"
            )
            raise ParameterError(msg)
        n = int(float(m.group(1)) * _DASK_UNITS[m.group(2).lower()])
    if n <= 0:
        msg = f"{field}={value!r} must be positive"
        raise ParameterError(msg)
    return n


@dataclass(frozen=True)
class Resources:
    """cpu, memory and ephemeral storage of one container (requests == limits).

    Examples
    --------
    >>> Resources(cpu="1", memory="4Gi", ephemeral_storage="10Gi").as_k8s()["limits"]
    {'cpu': '1', 'memory': '4Gi', 'ephemeral-storage': '10Gi'}
    """

    cpu: str = "1"
    memory: str = "4Gi"
    ephemeral_storage: str = "10Gi"

    def __post_init__(self) -> None:
        parse_cpu(self.cpu, field="cpu")
        parse_quantity_bytes(self.memory, field="memory")
        parse_quantity_bytes(self.ephemeral_storage, field="ephemeral_storage")

    @property
    def memory_bytes(self) -> int:
        """The memory limit in bytes."""
        return parse_quantity_bytes(self.memory, field="memory")

    def as_k8s(self) -> dict[str, dict[str, str]]:
        """The container's ``resources`` block."""
        values = {"cpu": str(self.cpu), "memory": str(self.memory),
                  "ephemeral-storage": str(self.ephemeral_storage)}
        return {"requests": dict(values), "limits": dict(values)}


def dask_memory_limit(resources: Resources, memory_limit: str | int | None = None,
                      *, field: str = "memory_limit") -> int:
    """Dask's ``--memory-limit`` in bytes for a worker in a container of ``resources``.

    ``None`` (or ``"auto"``) gives :data:`DEFAULT_MEMORY_FRACTION` of the container's
    memory limit; an explicit value must not exceed :data:`MAX_MEMORY_FRACTION` of it.

    Raises
    ------
    ParameterError
        When the value is not a size, or leaves the nanny no room below the container's
        limit (the message names both numbers and the largest value allowed).

    Examples
    --------
    >>> dask_memory_limit(Resources(memory="4Gi"))
    3650722201
    """
    container = resources.memory_bytes
    if memory_limit is None or memory_limit == "auto":
        return int(container * DEFAULT_MEMORY_FRACTION)
    wanted = _dask_bytes(memory_limit, field=field)
    ceiling = int(container * MAX_MEMORY_FRACTION)
    if wanted > ceiling:
        msg = (
            f"{field}={memory_limit!r} ({wanted} bytes) is too large for a container "
            f"memory limit of {resources.memory!r} ({container} bytes): Dask's memory "
            f"limit must stay at or below {MAX_MEMORY_FRACTION:.0%} of the container's "
            f"({ceiling} bytes), or the kubelet kills the worker before its nanny can; "
            f"lower {field} or raise the worker memory"
        )
        raise ParameterError(msg)
    return wanted
