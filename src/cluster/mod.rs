//! Several servers sharing one routing table: the store they share (etcd).

pub(crate) mod etcd;
