"""``python -m shimv2.guest``: the guest agent (see ``agent.py``)."""

import sys

from shimv2.guest.agent import main

sys.exit(main())
