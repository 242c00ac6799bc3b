package agent

import (
	"path/filepath"
	"time"
)

// Version is the protocol version the node announces in its hello.
const Version = 1

// SocketName is the file name of the node's socket in its state directory.
const SocketName = "agent.sock"

// SocketPath is the node's socket in stateDir.
func SocketPath(stateDir string) string { return filepath.Join(stateDir, SocketName) }

// Operations: the values of Msg.Op.
const (
	OpHello     = "hello"        // client → node: Purpose; reply: Hello
	OpIncRef    = "incref"       // ID
	OpDecRef    = "decref"       // ID
	OpTryRemove = "tryremove"    // ID; reply OK says whether it was removed
	OpBuild     = "build"        // ID; reply when the build settled (Outcome)
	OpCancel    = "cancel"       // Seq of a build request the caller gave up
	OpBuilt     = "built"        // Seq of a build request: the builder's result (Err, Codes)
	OpBuilderPG = "builder_pgid" // Seq of a build request: its builder runs in process group PID
	OpInspect   = "inspect"      // ID; reply Info and Holders
	OpBye       = "bye"          // client → node: release everything; reply, then the client closes
	OpReply     = "reply"        // node → client: the answer to Seq
	OpBuildNow  = "build_now"    // node → client: run the builder of build request Seq
	OpBuildStop = "build_stop"   // node → client: stop the builder of build request Seq
	OpRefLost   = "ref_lost"     // node → client: the host's reference to ID is gone with the package
	OpLeaseLost = "lease_lost"   // node → client: the node's lease is in doubt (Err)
	OpLeaseBack = "lease_restored"
	OpEvent     = "event" // node → client: a store event about a package the client builds or waits for

	// The package graph's operations (issue 20). Pin, unpin and
	// invalidate (and tryremove) are privileged: the node allows them to
	// root, its own user and its admin group only (ErrNotAllowed).
	OpPin        = "pin"        // ID, For, Note; reply Pin
	OpUnpin      = "unpin"      // ID; reply OK says whether there was a pin
	OpInvalidate = "invalidate" // ID, Note (the reason); reply Report
	OpWhy        = "why"        // ID; reply Why
)

// Msg is every message, in both directions: JSON, one per line. A request
// carries a sequence number chosen by the client; the node answers it with
// OpReply and the same number, in any order (slow requests do not hold up
// fast ones). Unused fields are omitted. The hot path's messages are flat
// (no Note, For, Holders, Info, Event, Outcome, Pin, Report or Why) and
// take the hand codec (codec.go), as does the handshake's reply (a flat
// message with a Hello).
type Msg struct {
	Op      string   `json:"op"`
	Seq     uint64   `json:"seq,omitempty"`
	ID      string   `json:"id,omitempty"`
	Purpose string   `json:"purpose,omitempty"`
	PID     int      `json:"pid,omitempty"`
	OK      bool     `json:"ok,omitempty"`
	Err     string   `json:"err,omitempty"`
	Codes   []string `json:"codes,omitempty"` // names of the sentinels Err wraps (errors.go)
	// Needs are the packages a build needs (OpBuild), in declared order.
	Needs []string `json:"needs,omitempty"`
	// Note is a pin's note (OpPin) or an invalidation's reason
	// (OpInvalidate).
	Note string `json:"note,omitempty"`
	// For is how long a pin lasts (OpPin; 0: until unpinned).
	For     time.Duration     `json:"for,omitempty"`
	Hello   *Hello            `json:"hello,omitempty"`
	Holders []Holder          `json:"holders,omitempty"`
	Info    *Info             `json:"info,omitempty"`
	Event   *Event            `json:"event,omitempty"`
	Outcome *Outcome          `json:"outcome,omitempty"`
	Pin     *PinRecord        `json:"pin,omitempty"`    // reply to OpPin
	Report  *InvalidateReport `json:"report,omitempty"` // reply to OpInvalidate
	Why     *Why              `json:"why,omitempty"`    // reply to OpWhy
}

// Hello is the node's side of the handshake.
type Hello struct {
	Version int    `json:"version"`
	Host    string `json:"host"`
	PID     int    `json:"pid"`
	Root    string `json:"root"`
	Prefix  string `json:"prefix"`
	UID     int    `json:"uid"` // the caller's, as the node saw it
	// Linger is how long the node keeps a package's etcd reference after
	// its last local holder.
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

// noticeOf returns the notice an unasked message m carries, if it is one.
func noticeOf(m *Msg) (Notice, bool) {
	switch m.Op {
	case OpRefLost:
		return Notice{Kind: NoticeRefLost, ID: m.ID, Err: &Error{Msg: m.Err}}, true
	case OpLeaseLost:
		return Notice{Kind: NoticeLeaseLost, Err: &Error{Msg: m.Err}}, true
	case OpLeaseBack:
		return Notice{Kind: NoticeLeaseRestored}, true
	}
	return Notice{}, false
}
