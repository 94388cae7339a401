"""chat-bridge: a chat backend for MQTT clients."""

from .config import Settings
from .errors import ChatError
from .service import Inbound, Service

__all__ = ["ChatError", "Inbound", "Service", "Settings"]
__version__ = "0.1.0"
