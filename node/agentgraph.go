package node

import (
	"os/user"
	"strconv"

	"github.com/granary-build/granary/agent"
	"github.com/granary-build/granary/etcdstore"
)

// The package graph's operations of the local API (issue 20): pin, unpin
// and invalidate are privileged (privilege.go); why is not.

// userName names the caller's user, for the records of pins and
// invalidations made through the node.
func (c *agentConn) userName() string {
	if u, err := user.LookupId(strconv.Itoa(c.uid)); err == nil && u.Username != "" {
		return u.Username
	}
	return "uid " + strconv.Itoa(c.uid)
}

// pin pins m.ID for m.For with note m.Note, recording the caller's user.
func (c *agentConn) pin(m *agent.Msg) {
	if !c.a.priv.allowed(c.uid, c.pid) {
		c.reply(m.Seq, c.a.priv.refuse("pin", m.ID, "pin packages"), nil)
		return
	}
	rec, err := c.a.store.Pin(c.ctx, m.ID, etcdstore.PinOptions{For: m.For, Note: m.Note, By: c.userName()})
	c.reply(m.Seq, err, func(r *agent.Msg) {
		if err == nil {
			w := recast[agent.PinRecord](rec)
			r.Pin = &w
		}
	})
}

// unpin removes m.ID's pin; OK says whether there was one.
func (c *agentConn) unpin(m *agent.Msg) {
	if !c.a.priv.allowed(c.uid, c.pid) {
		c.reply(m.Seq, c.a.priv.refuse("unpin", m.ID, "unpin packages"), nil)
		return
	}
	ok, err := c.a.store.Unpin(c.ctx, m.ID)
	c.reply(m.Seq, err, func(r *agent.Msg) { r.OK = ok && err == nil })
}

// invalidate invalidates m.ID for the reason m.Note, recording the
// caller's user.
func (c *agentConn) invalidate(m *agent.Msg) {
	if !c.a.priv.allowed(c.uid, c.pid) {
		c.reply(m.Seq, c.a.priv.refuse("invalidate", m.ID, "invalidate packages"), nil)
		return
	}
	rep, err := c.a.store.Invalidate(c.ctx, m.ID, m.Note, c.userName())
	c.reply(m.Seq, err, func(r *agent.Msg) {
		if err == nil {
			w := recast[agent.InvalidateReport](rep)
			r.Report = &w
		}
	})
}

// why explains what keeps m.ID from removal.
func (c *agentConn) why(m *agent.Msg) {
	w, err := c.a.store.Why(c.ctx, m.ID, etcdstore.DefaultHoldersWait)
	c.reply(m.Seq, err, func(r *agent.Msg) {
		if err == nil {
			ww := recast[agent.Why](w)
			r.Why = &ww
		}
	})
}
