"""The process grid (pipeline stages x tensor / expert ranks), its groups, and the sharding applied to a stage's model
from outside: ``grid`` (who holds what), ``shard`` (cutting a meta-device stage to one rank's share, and the
all-reduces that complete its blocks), ``group`` (a stage's torch.distributed groups). model/ never imports this
package; docs/distributed_design.md describes the design."""
