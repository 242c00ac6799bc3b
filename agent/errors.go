package agent

import (
	"context"
	"errors"

	"github.com/granary-build/granary/core"
)

// The agent's sentinels, the codes that carry sentinels across the socket,
// and Error. Messages read as core/errors.go says: no package prefix; an
// error of the node names its operation already, and one made on this
// side of the socket is named once, by Handle.fail or named.

var (
	// ErrNoLocalNode is wrapped by the error of Connect when no node
	// listens on the state directory's socket.
	ErrNoLocalNode = errors.New("no local node is running")

	// ErrNodeGone is wrapped by the errors of a connection whose node
	// closed it (it stopped, crashed or was killed) or that was closed.
	ErrNodeGone = errors.New("connection to the local node ended")

	// ErrWaiting is returned by ConnectHold with noWait when the node
	// reports that the reference waits for a build in progress.
	ErrWaiting = errors.New("the reference waits for a build in progress")

	// ErrLeaseLost is wrapped by the error of an operation that the node's
	// lease ended (the node's store lost its lease with etcd).
	ErrLeaseLost = errors.New("lease lost")

	// ErrFenced is wrapped by the error of a build whose attempt lost the
	// build lock before it could publish.
	ErrFenced = errors.New("build lock lost before publishing")

	// ErrAbandoned, wrapped by a builder's error, gives the attempt up as
	// if every caller had cancelled: nothing is published and hosts
	// waiting on it try themselves. The node also wraps it when the
	// process running the builder went away mid-build.
	ErrAbandoned = errors.New("attempt abandoned")

	// ErrClosed is wrapped by the error of an operation that the node's
	// store refused because it is shutting down.
	ErrClosed = errors.New("the node's store is closed")

	// ErrUnknownOp is the node's answer to an operation it does not know
	// (a client newer than the node).
	ErrUnknownOp = errors.New("unknown operation")

	// ErrNotAllowed is wrapped by the node's refusal of a privileged
	// operation (remove, pin, unpin, invalidate) to a caller that is not
	// root, the node's user or a member of its admin group; the message
	// names who may.
	ErrNotAllowed = errors.New("not allowed through the node")
)

// Codes: the names of the sentinels that cross the socket in Msg.Codes.
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
	CodeUnknownOp   = "unknownop"
	CodeInvalidated = "invalidated"
	CodeNotAllowed  = "notallowed"
)

// codes is the one table of codes and the sentinels they stand for, on
// both sides of the socket.
var codes = []struct {
	name string
	err  error
}{
	{CodeInvalid, core.ErrInvalidID},
	{CodeNotExist, core.ErrPackageNotExist},
	{CodeBuildFailed, core.ErrBuildFailed},
	{CodeNoRef, core.ErrNoRef},
	{CodeLeaseLost, ErrLeaseLost},
	{CodeFenced, ErrFenced},
	{CodeAbandon, ErrAbandoned},
	{CodeClosed, ErrClosed},
	{CodeCanceled, context.Canceled},
	{CodeDeadline, context.DeadlineExceeded},
	{CodeUnknownOp, ErrUnknownOp},
	{CodeInvalidated, core.ErrInvalidated},
	{CodeNotAllowed, ErrNotAllowed},
}

// Codes lists the names of the sentinels err wraps, for Msg.Codes.
func Codes(err error) []string {
	var out []string
	for _, c := range codes {
		if errors.Is(err, c.err) {
			out = append(out, c.name)
		}
	}
	return out
}

// Sentinel returns the sentinel error named by code, or nil.
func Sentinel(code string) error {
	for _, c := range codes {
		if c.name == code {
			return c.err
		}
	}
	return nil
}

// Error is an error that crossed the node's socket: its message as the
// node (or the builder's process) wrote it, and the sentinels it wrapped
// there, so that errors.Is(err, core.ErrPackageNotExist) and the like work
// on the client as they do in the node. A failed build whose builder ran
// in this process also wraps the builder's own error.
type Error struct {
	Msg   string
	Codes []string
	own   error
}

// Error returns the message.
func (e *Error) Error() string { return e.Msg }

// Unwrap returns the sentinels named by Codes and, for a build, the error
// of the builder that ran in this process.
func (e *Error) Unwrap() []error {
	var out []error
	for _, name := range e.Codes {
		if s := Sentinel(name); s != nil {
			out = append(out, s)
		}
	}
	if e.own != nil {
		out = append(out, e.own)
	}
	return out
}

// ErrorOf rebuilds the error a message carries (nil if none).
func ErrorOf(m *Msg) error {
	if m.Err == "" && len(m.Codes) == 0 {
		return nil
	}
	return &Error{Msg: m.Err, Codes: m.Codes}
}
