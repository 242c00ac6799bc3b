package node

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/granary-build/granary/etcdstore"
)

// Hold is one local reference to a package that the node keeps for a
// holder that is not a process on its socket: a Kubernetes pod whose
// volume shows the package (package node/csidriver). It takes and drops
// the host's reference exactly as a Conn's IncRef and DecRef do (through
// the host references, hostRefs.take and drop), so whatever protects a
// package held by a job protects it for a Hold too. Holders (and so
// `granary inspect`) lists it with its description until Release.
type Hold struct {
	n     *Node
	a     *server
	id    string
	pod   string // "namespace/name", for a pod's volume
	who   Holder
	mu    sync.Mutex
	freed bool
}

// heldSet is the agent's record of its Holds, for Holders. Its zero value
// is ready; mu is a leaf lock.
type heldSet struct {
	mu sync.Mutex
	m  map[*Hold]struct{}
}

func (s *heldSet) add(h *Hold) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.m == nil {
		s.m = make(map[*Hold]struct{})
	}
	s.m[h] = struct{}{}
}

func (s *heldSet) remove(h *Hold) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.m, h)
}

// pods returns the pods of id's Holds, sorted.
func (s *heldSet) pods(id string) []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []string
	for h := range s.m {
		if h.id == id && h.pod != "" {
			out = append(out, h.pod)
		}
	}
	slices.Sort(out)
	return out
}

// list returns the holders of id's Holds.
func (s *heldSet) list(id string) []Holder {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []Holder
	for h := range s.m {
		if h.id == id {
			out = append(out, h.who)
		}
	}
	return out
}

// HoldFor takes a local reference to id for the holder described by
// purpose (for example "pod default/job-x (uid …)"). It blocks as a
// Conn's IncRef does: when the host does not hold id's etcd reference yet
// it takes it, waiting for a build of id in progress on any host, until
// ctx ends. It fails with an error wrapping core.ErrPackageNotExist if id
// is not available and nothing builds it, and with ErrNodeGone once the
// node has stopped. The caller must Release the Hold. It may be called
// before Run (a restarted CSI driver takes its volumes' references again
// before anything serves).
func (n *Node) HoldFor(ctx context.Context, id, purpose string) (*Hold, error) {
	return n.HoldForPod(ctx, id, "", purpose)
}

// HoldForPod is HoldFor for a Kubernetes pod ("namespace/name"): the
// node's etcd reference to id also records the pods it holds the package
// for (etcdstore.Handle.RecordPods), so that inspect on every host and
// `granary events` (pod-mounted, pod-unmounted) name them.
func (n *Node) HoldForPod(ctx context.Context, id, pod, purpose string) (*Hold, error) {
	a := n.agent.Load()
	if a == nil {
		return nil, fmt.Errorf("incref %q: %w", id, ErrNodeGone)
	}
	// The path of a Conn's IncRef (agent.go, opIncRef).
	if !a.refs.tryFast(id) {
		if err := a.refs.take(ctx, id); err != nil {
			return nil, a.explain(err)
		}
	}
	h := &Hold{n: n, a: a, id: id, pod: pod, who: Holder{Since: time.Now(), Purpose: purpose}}
	a.held.add(h)
	if pod != "" {
		h.recordPods(ctx)
	}
	return h, nil
}

// ID returns the package the Hold holds.
func (h *Hold) ID() string { return h.id }

// Release drops the Hold's reference, as a Conn's DecRef does: the host's
// etcd reference goes after the node's linger if no other local holder
// has the package. Releasing twice is an error wrapping etcdstore.ErrNoRef.
func (h *Hold) Release() error {
	h.mu.Lock()
	freed := h.freed
	h.freed = true
	h.mu.Unlock()
	if freed {
		return fmt.Errorf("decref %q: %w", h.id, etcdstore.ErrNoRef)
	}
	h.a.held.remove(h)
	if h.pod != "" {
		h.recordPods(context.Background())
	}
	return h.a.refs.drop(h.id)
}

// recordPods writes the pods the node holds h's package for into its etcd
// reference. A failure is logged: the pods are for people, the reference
// itself stands.
func (h *Hold) recordPods(ctx context.Context) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), h.n.cfg.OpTimeout)
	defer cancel()
	if err := h.n.store.Handle(h.id).RecordPods(ctx, h.a.held.pods(h.id)); err != nil {
		h.n.log.Warn("recording the pods that hold a package failed", "id", h.id, "err", err)
	}
}
