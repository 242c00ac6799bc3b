// Package keys is the one table of Granary's etcd keys: every key the store
// and the node write under a prefix is built here, and every key a watcher
// reads is parsed here. docs/design.md's "Keys" table describes the same
// layout with the value of each key.
package keys

import (
	"fmt"
	"strings"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// The kinds of key: the first path element after the prefix.
const (
	Avail       = "avail"       // avail/<id>: the published record
	Build       = "build"       // build/<id>: a running or failed attempt
	ATime       = "atime"       // atime/<id>: last access
	Ref         = "ref"         // ref/<id>/<lease-hex>/<n>: a reference
	Lock        = "lock"        // lock/<id>/<lease-hex>: the package's mutex
	GC          = "gc"          // gc/<lease-hex>: the collector's mutex
	Failed      = "failed"      // failed/<id>: failure memory
	Ask         = "ask"         // ask/<kind>/<id>: a request to nodes
	Need        = "need"        // need/<need>/<dependent>: a published dependency edge
	Pin         = "pin"         // pin/<id>: a pin
	Invalid     = "invalid"     // invalid/<id>: an invalidation in force
	Invalidated = "invalidated" // invalidated/<id>: memory of a removed invalid package
	Node        = "node"        // node/<name>/<lease-hex>: a node's registration
	Root        = "root"        // root: the prefix's shared root
	Health      = "health"      // health: read by health checks (never written)
)

// Space builds the keys under one prefix (ending in "/").
type Space struct{ Prefix string }

// Key is the key of kind for id.
func (s Space) Key(kind, id string) string { return s.Prefix + kind + "/" + id }

// Kind is the prefix of every key of kind.
func (s Space) Kind(kind string) string { return s.Prefix + kind + "/" }

// AvailKey and the methods below build one key each (see the kinds above).
func (s Space) AvailKey(id string) string { return s.Key(Avail, id) }

// BuildKey is build/<id>.
func (s Space) BuildKey(id string) string { return s.Key(Build, id) }

// ATimeKey is atime/<id>.
func (s Space) ATimeKey(id string) string { return s.Key(ATime, id) }

// FailedKey is failed/<id>.
func (s Space) FailedKey(id string) string { return s.Key(Failed, id) }

// RefPrefix is ref/<id>/: every reference on id.
func (s Space) RefPrefix(id string) string { return s.Key(Ref, id) + "/" }

// LockPrefix is lock/<id>/: the package's etcd mutex.
func (s Space) LockPrefix(id string) string { return s.Key(Lock, id) + "/" }

// GCPrefix is gc/: the collector's etcd mutex.
func (s Space) GCPrefix() string { return s.Kind(GC) }

// AskKey is ask/<kind>/<id>.
func (s Space) AskKey(kind, id string) string { return s.Key(Ask, kind+"/"+id) }

// NeededBy is need/<need>/: one key per published package that needs need.
func (s Space) NeededBy(need string) string { return s.Key(Need, need) + "/" }

// NeedKey is need/<need>/<dependent>.
func (s Space) NeedKey(need, dependent string) string { return s.NeededBy(need) + dependent }

// PinKey is pin/<id>.
func (s Space) PinKey(id string) string { return s.Key(Pin, id) }

// InvalidKey is invalid/<id>.
func (s Space) InvalidKey(id string) string { return s.Key(Invalid, id) }

// InvalidatedKey is invalidated/<id>.
func (s Space) InvalidatedKey(id string) string { return s.Key(Invalidated, id) }

// RootKey is root.
func (s Space) RootKey() string { return s.Prefix + Root }

// HealthKey is health, a key nobody writes: reading it checks that etcd
// answers.
func (s Space) HealthKey() string { return s.Prefix + Health }

// NodeName is node/<name>/: every registration of one node name.
func (s Space) NodeName(name string) string { return s.Key(Node, name) + "/" }

// NodeKey is node/<name>/<lease-hex>.
func (s Space) NodeKey(name string, lease clientv3.LeaseID) string {
	return fmt.Sprintf("%s%x", s.NodeName(name), int64(lease))
}

// Parsed is a key taken apart.
type Parsed struct {
	Kind string // one of the kinds above, or "" for a key outside the prefix
	// ID is the package (or, for node, the node's name; for ask, the
	// package after the request kind; for gc, the lease).
	ID string
	// Rest is what follows the ID: a reference's lease/n, a lock's lease,
	// a need edge's dependent, a node's lease; for ask, the request kind.
	Rest string
}

// Parse takes a key of this space apart.
func (s Space) Parse(key string) Parsed {
	k, ok := strings.CutPrefix(key, s.Prefix)
	if !ok {
		return Parsed{}
	}
	kind, rest, _ := strings.Cut(k, "/")
	if kind == Ask {
		what, id, _ := strings.Cut(rest, "/")
		return Parsed{Kind: kind, ID: id, Rest: what}
	}
	id, rest, _ := strings.Cut(rest, "/")
	return Parsed{Kind: kind, ID: id, Rest: rest}
}
