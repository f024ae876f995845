"""``python -m shimv2.guest``: the guest agent (see ``agent.py``)."""

import gc
import sys

# The collector finds nothing to free while modules load, and its passes cost ~5% of
# the imports (under TCG, ~0.1 s); the agent turns it back on once it serves.
gc.disable()

from shimv2.guest.agent import main  # noqa: E402

sys.exit(main())
