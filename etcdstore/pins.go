package etcdstore

import (
	"context"
	"fmt"
	"os"
	"os/user"
	"strconv"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/granary-build/granary/core"
)

// A pin keeps a package (and so, through its need edges, its closure) from
// every removal until it is unpinned or expires. It is P/pin/<id> with no
// lease: it belongs to no process and survives every restart. The removal
// Txn requires the key absent; an expired pin (Until passed) is deleted by
// the removal that finds it, in a Txn that requires it unchanged, so a pin
// renewed meanwhile stands. Expiry is judged by the remover's clock.

// PinRecord is the value of P/pin/<id>.
type PinRecord struct {
	By    string    `json:"by"` // user who pinned
	Host  string    `json:"host"`
	At    time.Time `json:"at"`
	Until time.Time `json:"until,omitzero"` // zero: until unpinned
	Note  string    `json:"note,omitempty"`
}

// Expired reports whether the pin's time is over at now.
func (p *PinRecord) Expired(now time.Time) bool { return !p.Until.IsZero() && !now.Before(p.Until) }

// PinOptions are Pin's optional settings.
type PinOptions struct {
	For  time.Duration // 0: until unpinned
	Note string        // why, for people
	By   string        // who; "" names the current user
}

// Pin pins the published package id, replacing an earlier pin of it. It
// returns an error wrapping core.ErrPackageNotExist when id is not
// published (or is invalid).
func (s *Store) Pin(ctx context.Context, id string, o PinOptions) (PinRecord, error) {
	if err := core.ValidateID(id); err != nil {
		return PinRecord{}, fmt.Errorf("pin: %w", err)
	}
	rec := PinRecord{By: o.By, Host: s.opt.host, At: time.Now().UTC(), Note: o.Note}
	if rec.By == "" {
		rec.By = currentUser()
	}
	if o.For > 0 {
		rec.Until = rec.At.Add(o.For)
	}
	cctx, cancel := s.opCtx(ctx)
	defer cancel()
	resp, err := s.cli.Txn(cctx).
		If(
			// Only a published package, so a pin never outlives its package
			// unnoticed: a removal requires the pin absent.
			clientv3.Compare(clientv3.CreateRevision(s.keys.AvailKey(id)), ">", 0),
			// A package on its way out is not pinned back.
			clientv3.Compare(clientv3.CreateRevision(s.keys.InvalidKey(id)), "=", 0),
		).
		Then(clientv3.OpPut(s.keys.PinKey(id), mustJSON(rec))).
		Else(clientv3.OpGet(s.keys.InvalidKey(id))).
		Commit()
	if err != nil {
		return PinRecord{}, fmt.Errorf("pin %q: %w", id, err)
	}
	if !resp.Succeeded {
		if kvs := resp.Responses[0].GetResponseRange().Kvs; len(kvs) > 0 {
			if inv, derr := decode[InvalidRecord](kvs[0].Value); derr == nil {
				return PinRecord{}, fmt.Errorf("pin: %w", inv.err(id))
			}
		}
		return PinRecord{}, fmt.Errorf("pin %q: %w", id, core.ErrPackageNotExist)
	}
	return rec, nil
}

// Unpin removes id's pin. It reports whether there was one.
func (s *Store) Unpin(ctx context.Context, id string) (bool, error) {
	if err := core.ValidateID(id); err != nil {
		return false, fmt.Errorf("unpin: %w", err)
	}
	cctx, cancel := s.opCtx(ctx)
	defer cancel()
	resp, err := s.cli.Delete(cctx, s.keys.PinKey(id))
	if err != nil {
		return false, fmt.Errorf("unpin %q: %w", id, err)
	}
	return resp.Deleted > 0, nil
}

// pinGone reports whether st's pin is not in force: there is none, or it
// expired and is deleted now (only if unchanged since read, so a pin
// renewed meanwhile stands).
func (s *Store) pinGone(ctx context.Context, id string, st state) (bool, error) {
	if st.pin == nil {
		return true, nil
	}
	if !st.pin.Expired(time.Now()) {
		return false, nil
	}
	cctx, cancel := s.opCtx(ctx)
	defer cancel()
	resp, err := s.cli.Txn(cctx).
		If(clientv3.Compare(clientv3.ModRevision(s.keys.PinKey(id)), "=", st.pinRev)).
		Then(clientv3.OpDelete(s.keys.PinKey(id))).
		Commit()
	if err != nil {
		return false, err
	}
	return resp.Succeeded, nil
}

// currentUser names the user this process runs as.
func currentUser() string {
	if u, err := user.Current(); err == nil && u.Username != "" {
		return u.Username
	}
	if u := os.Getenv("USER"); u != "" {
		return u
	}
	return strconv.Itoa(os.Getuid())
}
