"""Names in Serval: serviceIDs (and prefixes of them), self-certifying keys, flowIDs."""

from .entropy import SecureRandom
from .flow_id import FLOW_ID_MAX, FlowID, FlowIDsExhausted, InvalidFlowID, allocate_flow_id
from .keys import NotCertified, ServiceKey, ServicePublicKey, key_hash
from .service_id import (
    InvalidServiceID,
    PrefixLike,
    ServiceID,
    ServiceLike,
    ServicePrefix,
    as_service_id,
    as_service_prefix,
    parse_service,
)

__all__ = [
    "FLOW_ID_MAX",
    "FlowID",
    "FlowIDsExhausted",
    "InvalidFlowID",
    "InvalidServiceID",
    "NotCertified",
    "PrefixLike",
    "ServiceID",
    "ServiceKey",
    "ServiceLike",
    "ServicePrefix",
    "SecureRandom",
    "ServicePublicKey",
    "allocate_flow_id",
    "as_service_id",
    "as_service_prefix",
    "key_hash",
    "parse_service",
]
