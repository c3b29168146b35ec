//! vhost-user frontend and the IOTLB protocol codec.
