"""The node's exceptions, converted at the edges: to DICOM statuses in ``scp``,
to ``ClickException`` in ``cli``, to audit outcomes in ``tasks``."""


class NodeError(Exception):
    """Base class of every error the node raises on purpose."""


class ConfigError(NodeError):
    """The configuration is missing, unreadable or invalid; the message names the key."""


class SpoolError(NodeError):
    """An instance cannot be written to the spool."""


class InvalidUIDError(SpoolError):
    """A UID is not a valid DICOM UID and must not become a path."""


class DiskFullError(SpoolError):
    """Free disk space is below the configured minimum."""


class DatasetTooLargeError(SpoolError):
    """A data set is larger than the configured maximum."""


class ImageTooLargeError(SpoolError):
    """An image declares more pixels (Rows x Columns x frames) than the configured budget."""


class UnreadableDatasetError(SpoolError):
    """A received data set cannot be decoded."""


class DuplicateInstanceError(SpoolError):
    """A SOP Instance UID the node holds in one study arrives in another."""


class SOPClassMismatchError(SpoolError):
    """A data set's SOP Class differs from the one its C-STORE request names."""


class StateInUseError(NodeError):
    """Another ``serve`` holds the state folder."""


class PortInUseError(NodeError):
    """The SCP's address is already taken by another program."""


class WeightsCheckError(NodeError):
    """A weights file of the pipeline is missing or differs from its manifest."""


class PeerError(NodeError):
    """A DICOM peer could not be reached or refused the request."""


class AuditError(NodeError):
    """The audit trail cannot be written or read."""


class DataRemovalError(NodeError):
    """Spooled images or results cannot be deleted safely."""


class NoSuchJobError(NodeError):
    """No job has the id asked for."""


class StateChangeError(NodeError):
    """A job's or delivery's state does not allow the change asked for."""


class SchemaVersionError(NodeError):
    """A database's schema is not the revision this code needs; the message says what to run."""
