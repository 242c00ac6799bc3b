package agent

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"time"

	"github.com/granary-build/granary/core"
)

// Get returns the handler of package id. It does no I/O.
func (c *Conn) Get(id string) core.PackageHandler { return c.Handle(id) }

// Handle is Get with the concrete type, which has the context variants.
func (c *Conn) Handle(id string) *Handle {
	return &Handle{c: c, id: id, err: core.ValidateID(id)}
}

// Inspect returns the package's etcd record, as the node's store reads it
// (other hosts' nodes asked for their local holder counts), and the local
// references held through the node, oldest first.
func (c *Conn) Inspect(ctx context.Context, id string) (Info, []Holder, error) {
	if err := core.ValidateID(id); err != nil {
		return Info{}, nil, fmt.Errorf("inspect: %w", err)
	}
	r, err := c.request(ctx, Msg{Op: OpInspect, ID: id})
	if err == nil && r.Info == nil {
		err = errors.New("the node's answer has no record")
	}
	if err != nil {
		return Info{}, nil, named(OpInspect, id, err)
	}
	return *r.Info, r.Holders, nil
}

// Handle is one package of a Conn: a core.ContextHandler.
type Handle struct {
	c   *Conn
	id  string
	err error // the ID's validation
}

// ID returns the package ID.
func (h *Handle) ID() string { return h.id }

// OutputDirectory is <root>/pkgs/<id>/contents (the store's layout), or ""
// for an invalid ID.
func (h *Handle) OutputDirectory() string {
	if h.err != nil {
		return ""
	}
	return filepath.Join(h.c.hello.Root, "pkgs", h.id, "contents")
}

// LoggingDirectory is <root>/pkgs/<id>/logs, or "" for an invalid ID.
func (h *Handle) LoggingDirectory() string {
	if h.err != nil {
		return ""
	}
	return filepath.Join(h.c.hello.Root, "pkgs", h.id, "logs")
}

// fail names the operation in an error made on this side of the socket.
func (h *Handle) fail(op string, err error) error { return named(op, h.id, err) }

// named prefixes err with the operation and the package, unless the node
// made it: the node's errors name their operation already.
func named(op, id string, err error) error {
	var remote *Error
	if errors.As(err, &remote) {
		return err
	}
	return fmt.Errorf("%s %q: %w", op, id, err)
}

// IncRef is IncRefContext with a background context.
func (h *Handle) IncRef() error { return h.IncRefContext(context.Background()) }

// DecRef is DecRefContext with a background context.
func (h *Handle) DecRef() error { return h.DecRefContext(context.Background()) }

// TryRemove is TryRemoveContext with a background context.
func (h *Handle) TryRemove() (bool, error) { return h.TryRemoveContext(context.Background()) }

// Build is BuildContext with a background context.
func (h *Handle) Build(builder func() error) error {
	return h.BuildContext(context.Background(), func(context.Context) error { return builder() })
}

// IncRefContext takes a reference held by the node for this connection.
// If the host holds the package already, the node answers from memory;
// otherwise it takes the host's etcd reference first, which may wait for
// a build in progress. It returns an error wrapping core.ErrPackageNotExist
// if the package is not available. If ctx has ended already, nothing is
// asked of the node; if it ends before the node answers, a reference the
// node grants afterwards is given back.
func (h *Handle) IncRefContext(ctx context.Context) error {
	if h.err != nil {
		return h.fail(OpIncRef, h.err)
	}
	return h.incref(ctx, h.c.sendUnlessDone(ctx, Msg{Op: OpIncRef, ID: h.id}, true), false)
}

// incref waits for the IncRef sent as s and counts the reference.
func (h *Handle) incref(ctx context.Context, s sent, noWait bool) error {
	if _, err := h.c.await(ctx, s, noWait); err != nil {
		if errors.Is(err, ErrWaiting) {
			return err
		}
		return h.fail(OpIncRef, err)
	}
	h.c.mu.Lock()
	h.c.held[h.id]++
	h.c.mu.Unlock()
	return nil
}

// DecRefContext releases the newest reference this connection holds on
// the package (an error wrapping core.ErrNoRef if it holds none, known
// without asking the node). The host's etcd reference goes after the
// node's linger if no other local holder has the package. It waits for the
// node's answer, so that a TryRemove from any other connection that starts
// after it returns sees the reference gone. If ctx has ended already, the
// reference stays held and nothing is asked of the node; once sent, the
// release happens even if ctx ends before the node answers.
func (h *Handle) DecRefContext(ctx context.Context) error {
	if h.err != nil {
		return h.fail(OpDecRef, h.err)
	}
	if err := ctx.Err(); err != nil {
		return h.fail(OpDecRef, err)
	}
	c := h.c
	c.mu.Lock()
	if c.held[h.id] == 0 {
		c.mu.Unlock()
		return h.fail(OpDecRef, core.ErrNoRef)
	}
	if c.held[h.id]--; c.held[h.id] == 0 {
		delete(c.held, h.id)
	}
	c.mu.Unlock()
	if _, err := c.await(ctx, c.send(Msg{Op: OpDecRef, ID: h.id}, true), false); err != nil {
		return h.fail(OpDecRef, err)
	}
	return nil
}

// TryRemoveContext removes the package unless a reference (local or of any
// host) or a build holds it. A host reference that only lingers, with no
// local holder, does not keep it. If ctx has ended already, nothing is
// asked of the node (false and ctx's error). If ctx ends after the request
// was sent and before the answer, the error wraps ctx's and the node may
// still remove the package, as a store's Txn cut short may apply.
func (h *Handle) TryRemoveContext(ctx context.Context) (bool, error) {
	if h.err != nil {
		return false, h.fail("remove", h.err)
	}
	r, err := h.c.request(ctx, Msg{Op: OpTryRemove, ID: h.id})
	if err != nil {
		return false, h.fail("remove", err)
	}
	return r.OK, nil
}

// PinOptions are Pin's optional settings.
type PinOptions struct {
	For  time.Duration // how long the pin lasts; 0: until unpinned
	Note string        // why, for people
}

// Pin pins the published package id in the node's store, replacing an
// earlier pin of it: no rm, gc or Prune removes it (nor, through its need
// edges, its closure) until it is unpinned or o.For passes. The pin
// records the caller's user and the node's host. It is privileged: the
// node refuses it, with an error wrapping ErrNotAllowed, to a caller that
// is not root, the node's user or a member of its admin group. It returns
// an error wrapping core.ErrPackageNotExist if id is not published.
func (c *Conn) Pin(ctx context.Context, id string, o PinOptions) (PinRecord, error) {
	if err := core.ValidateID(id); err != nil {
		return PinRecord{}, named(OpPin, id, err)
	}
	r, err := c.request(ctx, Msg{Op: OpPin, ID: id, For: o.For, Note: o.Note})
	if err == nil && r.Pin == nil {
		err = errors.New("the node's answer has no pin")
	}
	if err != nil {
		return PinRecord{}, named(OpPin, id, err)
	}
	return *r.Pin, nil
}

// Unpin removes id's pin and reports whether there was one. It is
// privileged, as Pin is.
func (c *Conn) Unpin(ctx context.Context, id string) (bool, error) {
	if err := core.ValidateID(id); err != nil {
		return false, named(OpUnpin, id, err)
	}
	r, err := c.request(ctx, Msg{Op: OpUnpin, ID: id})
	if err != nil {
		return false, named(OpUnpin, id, err)
	}
	return r.OK, nil
}

// Invalidate marks the published package id, and every package that needs
// it, bad cluster-wide: no new reference is granted on them (an IncRef
// fails with an error wrapping core.ErrPackageNotExist and
// core.ErrInvalidated that says who invalidated it and why), jobs holding
// them keep running, and each is removed as soon as its last holder
// leaves. The report says which were removed at once and which are held.
// It is privileged, as Pin is.
func (c *Conn) Invalidate(ctx context.Context, id, reason string) (InvalidateReport, error) {
	if err := core.ValidateID(id); err != nil {
		return InvalidateReport{}, named(OpInvalidate, id, err)
	}
	r, err := c.request(ctx, Msg{Op: OpInvalidate, ID: id, Note: reason})
	if err == nil && r.Report == nil {
		err = errors.New("the node's answer has no report")
	}
	if err != nil {
		return InvalidateReport{}, named(OpInvalidate, id, err)
	}
	return *r.Report, nil
}

// Why explains what keeps id from removal right now, as the node's store
// sees it (other hosts' nodes asked for their local holder counts).
func (c *Conn) Why(ctx context.Context, id string) (*Why, error) {
	if err := core.ValidateID(id); err != nil {
		return nil, named(OpWhy, id, err)
	}
	r, err := c.request(ctx, Msg{Op: OpWhy, ID: id})
	if err == nil && r.Why == nil {
		err = errors.New("the node's answer has no explanation")
	}
	if err != nil {
		return nil, named(OpWhy, id, err)
	}
	return r.Why, nil
}
