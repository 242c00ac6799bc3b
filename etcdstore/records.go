package etcdstore

import (
	"encoding/json"
	"fmt"
	"strconv"
	"time"
)

// PackageRecord is the value of P/avail/<id>: what was published.
type PackageRecord struct {
	BuiltBy      string    `json:"built_by"`
	PID          int       `json:"pid"`
	BuiltAt      time.Time `json:"built_at"`
	BuildSeconds float64   `json:"build_seconds"`
	Size         int64     `json:"size"`   // bytes of regular files
	Digest       string    `json:"digest"` // "sha256:…" over the tree, see TreeDigest
	FromCache    bool      `json:"from_cache,omitempty"`
	Attempt      int64     `json:"attempt"` // lock revision of the attempt that published
	// Entries is the number of top-level entries of contents/ (see
	// topEntries), so that another host can tell its stale listing from
	// the published tree. Zero in records of older versions: only the
	// tree's existence is checked then.
	Entries int `json:"entries,omitempty"`
	// Needs are the packages this one was built on (needs.go).
	Needs []string `json:"needs,omitempty"`
}

// Build attempt states.
const (
	BuildRunning = "building"
	BuildFailed  = "failed"
)

// BuildRecord is the value of P/build/<id>, kept on the builder's lease: the
// attempt in progress, or the last one that failed.
type BuildRecord struct {
	State   string    `json:"state"`
	Host    string    `json:"host"`
	PID     int       `json:"pid"`
	Started time.Time `json:"started"`
	LogDir  string    `json:"log_dir"`
	Attempt int64     `json:"attempt"`
	Error   string    `json:"error,omitempty"`
	// Command is what the builder's process runs, when a node runs the
	// builder in its caller's process (WithBuilderProcess).
	Command string `json:"command,omitempty"`
}

// refRecord is the value of a reference key.
type refRecord struct {
	Host    string    `json:"host"`
	PID     int       `json:"pid"`
	Since   time.Time `json:"since"`
	Purpose string    `json:"purpose,omitempty"`
	// Cached: a node's host reference, which a removal may ask it to
	// release when no job on the host holds the package (yield.go).
	Cached bool `json:"cached,omitempty"`
	// Holders is how many local jobs held the package through a cached
	// reference at HoldersAt, written when another host asked
	// (AskHolders).
	Holders   int       `json:"holders,omitempty"`
	HoldersAt time.Time `json:"holders_at,omitzero"`
	// Pods are the Kubernetes pods ("namespace/name") whose volumes hold
	// the package through a cached reference (RecordPods).
	Pods []string `json:"pods,omitempty"`
}

func mustJSON(v any) string {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err) // only our own plain structs are marshalled
	}
	return string(b)
}

func decode[T any](b []byte) (*T, error) {
	v := new(T)
	if err := json.Unmarshal(b, v); err != nil {
		return nil, fmt.Errorf("corrupt record %q: %w", b, err)
	}
	return v, nil
}

func formatNanos(t time.Time) string { return strconv.FormatInt(t.UnixNano(), 10) }

func parseNanos(b []byte) time.Time {
	n, err := strconv.ParseInt(string(b), 10, 64)
	if err != nil {
		return time.Time{}
	}
	return time.Unix(0, n)
}
