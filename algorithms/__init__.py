"""Built-in algorithms, one per module, each written only against fedsim's public API.

Importing this package registers them; the registry imports it on first lookup.
"""

from . import dfedavg, dfedsam, dpsgd, fedasync, fedavg, fedbuff, fedcompass, gossip, modest, ferret, lora_fair, robust  # noqa: F401
from . import ditto, fedavg_ft, fedbn, feddyn, fednova, fedopt, fedprox, fedrep, local, moon, scaffold  # noqa: F401
from . import choco  # noqa: F401
