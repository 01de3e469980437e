"""refcache: offline reference log-prob cache for DPO. This package is the top: the `refcache` command
(refcache/cli.py) and `refcache demo`; the stages are pipeline/, dpo/ and queries/, and what they share is in
refcache_base/."""

from refcache_base import UserError, __version__

__all__ = ["UserError", "__version__"]
