package node

import (
	"context"
	"errors"
	"fmt"
	"sync"

	"github.com/granary-build/granary/etcdstore"
)

// LocalRefs are references taken by the program that serves a LocalAPI,
// for itself and without a socket: for a program that embeds the node and
// also runs jobs (a CI bot holding its jobs' packages, a simulation of
// many hosts in one process). Each reference counts as a local holder of
// the host's etcd reference exactly as a Conn's does: the first one takes
// the host's etcd reference, a warm one costs no I/O (a mutex and a map),
// and the last DecRef starts the linger. A removal from any host is
// blocked while one is held.
//
// Unlike a Conn's, these references are not listed by Holders (they have
// no peer process) and do not end with a connection: they last until
// DecRef or Close, or until the store's lease ends with the program. The
// program learns of a lost lease from its own store's events. A LocalRefs
// is safe for concurrent use.
type LocalRefs struct {
	a    *server
	mu   sync.Mutex
	held map[string]int // references held, by package; nil once closed
}

// LocalRefs returns an empty set of in-process references through l.
func (l *LocalAPI) LocalRefs() *LocalRefs {
	return &LocalRefs{a: l.a, held: make(map[string]int)}
}

// IncRef takes a reference to id. It blocks only when the host does not
// hold id's etcd reference yet: then it takes it (one store IncRef for
// every local caller that comes meanwhile, which may wait for a build in
// progress), and fails with an error wrapping core.ErrPackageNotExist if
// id is not available. It fails after Close.
func (r *LocalRefs) IncRef(ctx context.Context, id string) error {
	r.mu.Lock()
	closed := r.held == nil
	r.mu.Unlock()
	if closed {
		return fmt.Errorf("incref %q: %w", id, ErrNodeGone)
	}
	if !r.a.refs.tryFast(id) {
		if err := r.a.refs.take(ctx, id); err != nil {
			return r.a.explain(err)
		}
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.held == nil {
		// Closed meanwhile: Close did not see this reference.
		r.a.refs.drop(id) //nolint:errcheck // only fails if not held, and it is
		return fmt.Errorf("incref %q: %w", id, ErrNodeGone)
	}
	r.held[id]++
	return nil
}

// DecRef drops one reference to id taken with IncRef; it is an error
// (wrapping etcdstore.ErrNoRef) if r holds none. With a linger (the
// default) it does not wait for etcd: the host's etcd reference goes after
// the linger, in the background; with none, the last local DecRef deletes
// it before returning, as a Conn's does.
func (r *LocalRefs) DecRef(id string) error {
	r.mu.Lock()
	if r.held[id] == 0 {
		r.mu.Unlock()
		return fmt.Errorf("decref %q: %w", id, etcdstore.ErrNoRef)
	}
	if r.held[id]--; r.held[id] == 0 {
		delete(r.held, id)
	}
	r.mu.Unlock()
	return r.a.refs.drop(id)
}

// Close drops every reference r holds, as DecRef does, and returns the
// errors of those drops; r takes no more. Closing twice is a no-op.
func (r *LocalRefs) Close() error {
	r.mu.Lock()
	held := r.held
	r.held = nil
	r.mu.Unlock()
	var errs []error
	for id, n := range held {
		for range n {
			errs = append(errs, r.a.refs.drop(id))
		}
	}
	return errors.Join(errs...)
}
