package agent

import "time"

// The types below are the wire form of the node store's (etcdstore's)
// records, events and outcomes: the same JSON, so that this package needs
// neither etcdstore nor etcd. Package node converts between them and
// etcdstore's types (and a test there holds the JSON of both equal).

// State is a package's state, as Inspect reports it.
type State string

// Package states.
const (
	StateAvailable State = "available" // published
	StateBuilding  State = "building"  // an attempt holds the lock
	StateFailed    State = "failed"    // the last attempt failed; its builder is still alive
	StateAbsent    State = "absent"    // none of the above
)

// Info describes one package: the node store's record of it in etcd.
type Info struct {
	ID        string         `json:"id"`
	State     State          `json:"state"`
	OutputDir string         `json:"output_dir"`
	LogDir    string         `json:"log_dir"`
	Package   *PackageRecord `json:"package,omitempty"` // when available
	Build     *BuildRecord   `json:"build,omitempty"`   // attempt in progress or last failure
	Refs      []RefInfo      `json:"refs"`
	ATime     time.Time      `json:"atime,omitzero"`
	// NeededBy lists the published packages that need this one (its needs
	// are Package.Needs).
	NeededBy []string   `json:"needed_by"`
	Pin      *PinRecord `json:"pin,omitempty"`
	// Invalid is the invalidation in force; Invalidated, that of an
	// invalidated package already removed (kept for the failure retention).
	Invalid     *InvalidRecord `json:"invalid,omitempty"`
	Invalidated *InvalidRecord `json:"invalidated,omitempty"`
}

// PackageRecord is a published package's record: who built it, when, its
// size and digest.
type PackageRecord struct {
	BuiltBy      string    `json:"built_by"`
	PID          int       `json:"pid"`
	BuiltAt      time.Time `json:"built_at"`
	BuildSeconds float64   `json:"build_seconds"`
	Size         int64     `json:"size"`
	Digest       string    `json:"digest"`
	FromCache    bool      `json:"from_cache,omitempty"`
	Attempt      int64     `json:"attempt"`
	Entries      int       `json:"entries,omitempty"`
	Needs        []string  `json:"needs,omitempty"` // the packages it was built on
}

// PinRecord is a pin: it keeps a package, and its closure, from every
// removal until it is unpinned or Until passes.
type PinRecord struct {
	By    string    `json:"by"` // user who pinned
	Host  string    `json:"host"`
	At    time.Time `json:"at"`
	Until time.Time `json:"until,omitzero"` // zero: until unpinned
	Note  string    `json:"note,omitempty"`
}

// InvalidRecord is an invalidation: who marked the package bad, when and
// why (Cause names the need whose invalidation invalidated it).
type InvalidRecord struct {
	By      string    `json:"by"`
	Host    string    `json:"host"`
	At      time.Time `json:"at"`
	Reason  string    `json:"reason"`
	Cause   string    `json:"cause,omitempty"`
	Digest  string    `json:"digest,omitempty"`
	Attempt int64     `json:"attempt,omitempty"`
	Removed time.Time `json:"removed,omitzero"` // when the package was removed
}

// InvalidateReport is what an invalidation did: the packages it
// invalidated (dependents first), those removed at once, and those
// removed when their last holder leaves.
type InvalidateReport struct {
	Invalidated []string `json:"invalidated"`
	Removed     []string `json:"removed"`
	Held        []string `json:"held"`
}

// Why is what keeps one package from removal: its references, its pin, the
// packages that need it (each with what keeps it), a build in progress,
// the gc grace period and an invalidation. Alive says whether anything
// but the grace period keeps it from rm; Seen marks a dependent explained
// higher up in the tree (its other fields are empty).
type Why struct {
	ID         string         `json:"id"`
	State      State          `json:"state"`
	Refs       []RefInfo      `json:"refs"`
	Pin        *PinRecord     `json:"pin,omitempty"`
	NeededBy   []*Why         `json:"needed_by,omitempty"`
	Build      *BuildRecord   `json:"build,omitempty"`
	GraceUntil time.Time      `json:"grace_until,omitzero"`
	Invalid    *InvalidRecord `json:"invalid,omitempty"`
	Alive      bool           `json:"alive"`
	Seen       bool           `json:"seen,omitempty"`
}

// BuildRecord is an attempt in progress, or the last one that failed.
type BuildRecord struct {
	State   string    `json:"state"`
	Host    string    `json:"host"`
	PID     int       `json:"pid"`
	Started time.Time `json:"started"`
	LogDir  string    `json:"log_dir"`
	Attempt int64     `json:"attempt"`
	Error   string    `json:"error,omitempty"`
	Command string    `json:"command,omitempty"`
}

// RefInfo is one etcd reference to a package. Cached marks a node's host
// reference; Holders is how many jobs of that host held the package when
// it was last asked (HoldersAt); Pods are the Kubernetes pods
// ("namespace/name") whose volumes that node publishes from it.
type RefInfo struct {
	Host      string    `json:"host"`
	PID       int       `json:"pid"`
	Since     time.Time `json:"since"`
	Purpose   string    `json:"purpose,omitempty"`
	Lease     string    `json:"lease"`
	Cached    bool      `json:"cached,omitempty"`
	Holders   int       `json:"holders,omitempty"`
	HoldersAt time.Time `json:"holders_at,omitzero"`
	Pods      []string  `json:"pods,omitempty"`
}

// EventKind says what an Event reports. The values are etcdstore's
// EventKind numbers; only the kinds below reach a connection.
type EventKind int

// The event kinds the node passes on to the connections building or
// waiting for a package.
const (
	// EventWaiting: another host's attempt holds the build lock (Host,
	// PID, Since and LogDir name it).
	EventWaiting EventKind = 1
	// EventLockDelay: an earlier attempt left its output directory;
	// waiting Elapsed before it is moved aside.
	EventLockDelay EventKind = 2
	// EventCacheHit: the package came from the node's remote cache.
	EventCacheHit EventKind = 4
	// EventPublished: the package is available (Size, Digest, Elapsed).
	EventPublished EventKind = 5
	// EventFailed: an attempt failed (Err; Host and LogDir of the attempt).
	EventFailed EventKind = 6
	// EventCacheUploadFailed: uploading the package to the remote cache
	// failed (Err).
	EventCacheUploadFailed EventKind = 11
	// EventCacheStored: the package was uploaded to the remote cache.
	EventCacheStored EventKind = 12
	// EventCacheMiss: the remote cache did not have the package (Err if
	// asking it failed).
	EventCacheMiss EventKind = 13
	// EventLastFailed: the last attempt failed (Host, PID, LogDir, Err);
	// this is a new one.
	EventLastFailed EventKind = 14
	// EventWaitInvalid: the package was invalidated (Host, Since: where and
	// when; Err: by whom and why); the build waits for its holders to
	// leave and its removal, then builds it anew.
	EventWaitInvalid EventKind = 26
)

// Event is one step of a build's progress, from the node's store.
type Event struct {
	Kind    EventKind     `json:"kind"`
	ID      string        `json:"id"`
	Time    time.Time     `json:"time"`
	Host    string        `json:"host,omitempty"`
	PID     int           `json:"pid,omitempty"`
	Since   time.Time     `json:"since,omitzero"`
	LogDir  string        `json:"log_dir,omitempty"`
	Elapsed time.Duration `json:"elapsed,omitempty"`
	Size    int64         `json:"size,omitempty"`
	Digest  string        `json:"digest,omitempty"`
	Err     string        `json:"err,omitempty"` // the error's message, if any
}

// How says how a build ended with the package available. The values are
// etcdstore's How numbers.
type How int

// The ways a build ends with the package available.
const (
	AlreadyAvailable How = 1 // published before the attempt began
	Built            How = 2 // this host's attempt ran a builder and published
	FromCache        How = 3 // this host's attempt fetched it from the remote cache
	Waited           How = 4 // another host's attempt published
)

// Outcome is what a successful build did, from the node's side.
type Outcome struct {
	How     How
	Package *PackageRecord // the published record
	LogDir  string         // the package's logging directory
	Waited  time.Duration  // time spent waiting for another host's attempt
	Elapsed time.Duration  // from the node's call to its return
}
