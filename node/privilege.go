package node

import (
	"bufio"
	"fmt"
	"os"
	"os/user"
	"slices"
	"strconv"
	"strings"

	"github.com/granary-build/granary/agent"
)

// Through the node's socket, any caller that can connect (the socket's
// group) may take references, run and build. Removing, pinning, unpinning
// and invalidating change what other users' jobs can rely on, and the node
// does them with its own etcd credentials, so they are privileged, as
// nix-daemon separates allowed from trusted users: the node allows them
// to root, to its own user and to members of its admin group
// (Config.AdminGroup), and refuses everyone else with an error wrapping
// agent.ErrNotAllowed that names who may. A node without an admin group
// allows root and its own user only, so a zero-config local node (whose
// socket only its user can reach) is unchanged.

// privilege decides who may do the node's privileged operations.
type privilege struct {
	uid   int    // the node's user
	user  string // its name, for messages
	group string // the admin group as configured ("" for none)
	gid   int    // its number (-1 for none)
}

// newPrivilege resolves the admin group (a name or a number).
func newPrivilege(adminGroup string) (*privilege, error) {
	p := &privilege{uid: os.Getuid(), user: strconv.Itoa(os.Getuid()), group: adminGroup, gid: -1}
	if u, err := user.LookupId(p.user); err == nil {
		p.user = u.Username
	}
	if adminGroup != "" {
		gid, err := lookupGroup(adminGroup)
		if err != nil {
			return nil, fmt.Errorf("admin group %q: %w", adminGroup, err)
		}
		p.gid = gid
	}
	return p, nil
}

// allowed reports whether the caller with uid and pid (from SO_PEERCRED)
// may do a privileged operation: root, the node's user, or a process whose
// primary or supplementary groups (from /proc/<pid>/status, read now)
// include the admin group. A pid whose status cannot be read is refused
// unless its uid alone allows it.
func (p *privilege) allowed(uid, pid int) bool {
	if uid == 0 || uid == p.uid {
		return true
	}
	if p.gid < 0 || pid <= 0 {
		return false
	}
	gids, err := procGroups(pid)
	if err != nil {
		return false
	}
	return slices.Contains(gids, p.gid)
}

// procGroups reads a process's real gid and supplementary groups from
// /proc/<pid>/status (SO_PEERCRED gives only the primary gid).
func procGroups(pid int) ([]int, error) {
	f, err := os.Open("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var gids []int
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		key, val, ok := strings.Cut(sc.Text(), ":")
		if !ok || (key != "Gid" && key != "Groups") {
			continue
		}
		fields := strings.Fields(val)
		if key == "Gid" && len(fields) > 0 {
			fields = fields[:1] // real, effective, saved, fs: the real one
		}
		for _, s := range fields {
			if g, err := strconv.Atoi(s); err == nil {
				gids = append(gids, g)
			}
		}
	}
	return gids, sc.Err()
}

// notAllowed is the refusal of a privileged operation: its message names
// who may; it wraps agent.ErrNotAllowed.
type notAllowed struct{ msg string }

func (e *notAllowed) Error() string { return e.msg }
func (e *notAllowed) Unwrap() error { return agent.ErrNotAllowed }

// refuse is the refusal of op (rm, pin, unpin, invalidate) on id; what
// says what the operation does ("remove packages").
func (p *privilege) refuse(op, id, what string) error {
	who := fmt.Sprintf("only root and the node's user (%s) may %s through the node (it has no --admin-group)", p.user, what)
	if p.group != "" {
		who = fmt.Sprintf("only root, the node's user (%s) and members of group %s may %s through the node", p.user, p.group, what)
	}
	return &notAllowed{fmt.Sprintf("%s %s: refused: %s", op, id, who)}
}
