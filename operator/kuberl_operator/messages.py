"""What a condition message means, with the parts that change on every retry left out.

Some sentences the operator passes on change their text while they say the same thing: the
kubelet alternates a container between `ErrImagePull` (the registry's error) and `ImagePullBackOff`
(`Back-off pulling image "..."`, since Kubernetes 1.30 followed by `: ErrImagePull: <the same
error>`), and the API server's quota refusal reports the namespace's current usage
(`exceeded quota: q, requested: pods=1, used: pods=3, limited: pods=3`), which moves whenever
another pod comes or goes. A condition rewritten for each of those is a status write, a watch
event for every client and an extra reconcile pass, every few seconds, for as long as the job waits.

`same_meaning(old, new)` says whether `new` brings nothing that `old` does not say; the planner
and the effects layer then keep `old` (the condition is not rewritten and no Event is posted).
A back-off message that carries no cause (older kubelets) says nothing new after the error
itself; the error after such a back-off does, and replaces it once.
"""

from __future__ import annotations

import re

_IMAGE_PULL = re.compile(
    r'\b(?:ErrImagePull|ImagePullBackOff)(?:: Back-off pulling image "[^"]*")?(?:: ErrImagePull)?(?=: |$)')
_QUOTA_USED = re.compile(r"(exceeded quota: [^,]*, requested: \S*, )used: \S*?(?=, limited: )")
# Repetition counters as Events and `kubectl describe` print them: "(x3 over 2m)", "(5 times)".
_COUNTER = re.compile(r"\s*\((?:x\d+(?: over [^)]*)?|\d+ times?)\)")
_BARE_PULL = "ImagePull"


def gist(message: str) -> str:
    """`message` with its volatile parts normalised: both image-pull states as one, the back-off
    preamble dropped, the quota's `used:` amounts and repetition counters removed."""
    text = _IMAGE_PULL.sub(_BARE_PULL, message or "")
    text = _QUOTA_USED.sub(r"\1used: ...", text)
    return _COUNTER.sub("", text)


def same_meaning(old: str | None, new: str | None) -> bool:
    """Whether `new` says nothing that `old` does not: equal gists, or `new` an image-pull back-off
    without a cause about the same container that `old` already names the error of."""
    a, b = gist(old or ""), gist(new or "")
    return a == b or (b.endswith(_BARE_PULL) and a.startswith(b + ": "))
