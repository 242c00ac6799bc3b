// Package agent is the host agent's protocol and its client: how a
// process on a host talks to the host's node (package node, `granary
// serve` or the embedded node the CLI starts) over the unix socket
// <state>/agent.sock.
//
// Connect returns a Conn, a core.PackageManager whose references the node
// holds for the connection's lifetime and aggregates into one etcd
// reference per package for the whole host, and whose builds run one
// attempt per package on the host, with the builder in the caller's
// process. The node owns the connections and their references; a Conn owns
// only its socket, its idle watcher (a timer that reads the socket when
// no caller does) and the builders it runs.
//
// The protocol is defined here once: JSON lines, one Msg per line in each
// direction (proto.go); the operations (Op*); the records, events and
// outcomes of the node's store in their wire form (types.go); the error
// codes and the sentinels they stand for (errors.go); and a hand codec for
// the hot path's flat messages and the handshake's reply, byte for byte
// what encoding/json writes (codec.go). The node serves the protocol from these definitions.
//
// This package imports only the standard library and core (a test holds
// it to that), so that a program that only connects stays small, and
// cmd/granary-run starts in milliseconds. It dials with syscalls rather
// than package net, whose cgo resolver would make binaries dynamically
// linked.
package agent
