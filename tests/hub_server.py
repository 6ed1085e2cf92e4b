"""The tests' local Hub is the one users try push and pull on (``mnist-peft hub-local``): it lives in
``mnist_peft/hub/local_hub.py``; this name stays for the tests that import it."""

from mnist_peft.hub.local_hub import HubServer, StaleParentError, find_olah, free_port

__all__ = ["HubServer", "StaleParentError", "find_olah", "free_port"]
