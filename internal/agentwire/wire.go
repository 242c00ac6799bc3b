// Package agentwire is the host agent's protocol: JSON lines over the unix
// socket <state>/agent.sock, one Msg per line in each direction. A request
// carries a sequence number chosen by the client; the node answers it with
// op "reply" and the same number, in any order (slow requests do not hold
// up fast ones). The node also sends, unasked, "build_now" / "build_stop"
// for a build request whose builder must run or stop in the caller's
// process, and notices ("ref_lost", "lease_lost", "lease_restored").
// docs/design.md says why JSON lines and not gRPC.
//
// The node (package node) and its full client (node.Conn) add the fields
// that carry etcdstore's types (a package's record, a build's outcome, a
// store event) by embedding Msg; this package imports only the standard
// library, so that the light job launcher cmd/granary-run can speak the
// protocol (with Client) without linking etcd.
package agentwire

import (
	"errors"
	"time"
)

// Version is the protocol version the node announces in its hello.
const Version = 1

// Operations.
const (
	OpHello     = "hello"        // client → node: purpose; reply: Hello
	OpIncRef    = "incref"       // ID
	OpDecRef    = "decref"       // ID
	OpTryRemove = "tryremove"    // ID; reply OK says whether it was removed
	OpBuild     = "build"        // ID; reply when the build settled
	OpCancel    = "cancel"       // Seq of a build request the caller gave up
	OpBuilt     = "built"        // Seq of a build request: the builder's result (Err, Codes)
	OpBuilderPG = "builder_pgid" // Seq of a build request: its builder runs in process group PID
	OpInspect   = "inspect"      // ID; reply Info and Holders
	OpBye       = "bye"          // client → node: release everything; reply, then the client closes
	OpReply     = "reply"        // node → client: the answer to Seq
	OpBuildNow  = "build_now"    // node → client: run the builder of build request Seq
	OpBuildStop = "build_stop"
	OpRefLost   = "ref_lost" // node → client: the host's reference to ID is gone with the package
	OpLeaseLost = "lease_lost"
	OpLeaseBack = "lease_restored"
	OpEvent     = "event" // node → client: a store event about a package the client is building or waiting for
)

// Msg is the part of every message that needs no etcdstore type. Unused
// fields are omitted.
type Msg struct {
	Op      string   `json:"op"`
	Seq     uint64   `json:"seq,omitempty"`
	ID      string   `json:"id,omitempty"`
	Purpose string   `json:"purpose,omitempty"`
	PID     int      `json:"pid,omitempty"`
	OK      bool     `json:"ok,omitempty"`
	Err     string   `json:"err,omitempty"`
	Codes   []string `json:"codes,omitempty"` // sentinels the error wraps (Code*)
	Hello   *Hello   `json:"hello,omitempty"`
	Holders []Holder `json:"holders,omitempty"`
}

// Hello is the node's side of the handshake.
type Hello struct {
	Version int    `json:"version"`
	Host    string `json:"host"`
	PID     int    `json:"pid"`
	Root    string `json:"root"`
	Prefix  string `json:"prefix"`
	UID     int    `json:"uid"` // the caller's, as the node saw it
	// Linger is the node's: how long it keeps a package's etcd reference
	// after its last local holder.
	Linger time.Duration `json:"linger"`
}

// Holder is one local reference held through the node: the process that
// holds it (from SO_PEERCRED on its connection), since when, and the purpose
// its connection gave.
type Holder struct {
	UID     int       `json:"uid"`
	PID     int       `json:"pid"`
	Since   time.Time `json:"since"`
	Purpose string    `json:"purpose,omitempty"`
}

// The names of the sentinel errors that cross the socket in Msg.Codes;
// package node maps them to core's, etcdstore's and context's sentinels.
const (
	CodeInvalid     = "invalid"
	CodeNotExist    = "notexist"
	CodeBuildFailed = "buildfailed"
	CodeNoRef       = "noref"
	CodeLeaseLost   = "leaselost"
	CodeFenced      = "fenced"
	CodeAbandon     = "abandon"
	CodeClosed      = "closed"
	CodeCanceled    = "canceled"
	CodeDeadline    = "deadline"
)

// NoticeKind says what a Notice reports.
type NoticeKind string

// Notice kinds.
const (
	// NoticeRefLost: the host's reference to ID is gone with the package
	// (the node's lease was lost and the package removed meanwhile).
	// Whoever uses the package should stop.
	NoticeRefLost NoticeKind = "ref-lost"
	// NoticeLeaseLost: the node's lease is in doubt; it is taking its
	// references again.
	NoticeLeaseLost NoticeKind = "lease-lost"
	// NoticeLeaseRestored: the node has a new lease.
	NoticeLeaseRestored NoticeKind = "lease-restored"
	// NoticeNodeGone: the connection ended (Err says why); every reference
	// of the connection is gone with it.
	NoticeNodeGone NoticeKind = "node-gone"
)

// Notice is something the node told a connection without being asked.
type Notice struct {
	Kind NoticeKind
	ID   string // NoticeRefLost: the package
	Err  error
}

// NoticeOf returns the notice an unasked message m carries, if it is one.
func NoticeOf(m Msg) (Notice, bool) {
	switch m.Op {
	case OpRefLost:
		return Notice{Kind: NoticeRefLost, ID: m.ID, Err: errors.New(m.Err)}, true
	case OpLeaseLost:
		return Notice{Kind: NoticeLeaseLost, Err: errors.New(m.Err)}, true
	case OpLeaseBack:
		return Notice{Kind: NoticeLeaseRestored}, true
	}
	return Notice{}, false
}

// ErrNodeGone is wrapped by the errors of a connection whose node closed it
// (it stopped, crashed or was killed) or that was closed.
var ErrNodeGone = errors.New("granary: connection to the local node ended")
