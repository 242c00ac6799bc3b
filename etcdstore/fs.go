package etcdstore

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"time"
)

// TreeDigest returns "sha256:<hex>" over the tree at dir: for each entry in
// lexical order, its relative path, its type, whether it is executable,
// a file's contents and a symlink's target. Write permissions and times do
// not count, so sealing a tree (making it read-only) keeps its digest. It
// also returns the total size of the regular files.
func TreeDigest(dir string) (digest string, size int64, err error) {
	return walkTree(dir, false)
}

// sealTree computes TreeDigest and makes every file and directory of the
// tree read-only, in one walk.
func sealTree(dir string) (digest string, size int64, err error) {
	return walkTree(dir, true)
}

func walkTree(dir string, seal bool) (string, int64, error) {
	h := sha256.New()
	var size int64
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(dir, p)
		if err != nil {
			return err
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		mode := info.Mode()
		exec := mode.Perm()&0o111 != 0
		switch {
		case mode.IsDir():
			fmt.Fprintf(h, "d %q\n", rel)
		case mode.IsRegular():
			fmt.Fprintf(h, "f %q %t %d\n", rel, exec, info.Size())
			f, err := os.Open(p)
			if err != nil {
				return err
			}
			n, err := io.Copy(h, f)
			f.Close()
			if err != nil {
				return err
			}
			size += n
		case mode&fs.ModeSymlink != 0:
			target, err := os.Readlink(p)
			if err != nil {
				return err
			}
			fmt.Fprintf(h, "l %q %q\n", rel, target)
			return nil // symlinks have no permissions of their own
		default:
			return fmt.Errorf("%s: unsupported file type %v", p, mode.Type())
		}
		if seal && mode.Perm()&0o222 != 0 {
			return os.Chmod(p, mode.Perm()&^0o222)
		}
		return nil
	})
	if err != nil {
		return "", 0, err
	}
	return "sha256:" + hex.EncodeToString(h.Sum(nil)), size, nil
}

// moveToTrash renames path into the root's trash (one atomic rename on the
// server) and deletes it in the background. A missing path is not an error.
func (s *Store) moveToTrash(path string) error {
	var rnd [4]byte
	rand.Read(rnd[:])
	dst := filepath.Join(s.trashDir(), fmt.Sprintf("%s.%d.%x", filepath.Base(path), time.Now().UnixNano(), rnd))
	if err := os.Rename(path, dst); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		return fmt.Errorf("move %s to trash: %w", path, err)
	}
	// After Close, Prune sweeps the trash later.
	s.spawn(func() {
		if err := RemoveTree(dst); err != nil {
			s.opt.logger.Warn("cannot delete trash; the next prune retries", "path", dst, "err", err)
		}
	})
	return nil
}

// binding is the content of <root>/.granary/cluster.
type binding struct {
	ClusterID string    `json:"cluster_id"`
	Prefix    string    `json:"prefix"`
	BoundAt   time.Time `json:"bound_at"`
}

// bindRoot binds root to (cluster, prefix) on first use and refuses a root
// bound to anything else: two etcd clusters, or two prefixes, on one volume
// would build the same package twice and delete each other's packages.
func bindRoot(root string, cluster uint64, prefix string) error {
	want := binding{ClusterID: strconv.FormatUint(cluster, 16), Prefix: prefix, BoundAt: time.Now().UTC()}
	path := filepath.Join(root, ".granary", "cluster")
	var b []byte
	var err error
	// A binding that vanishes between a failed link and the read (an
	// operator resetting the root, an NFS client's stale negative lookup)
	// is looked up again rather than reported.
	for attempt := 1; ; attempt++ {
		b, err = readOrBind(path, want)
		if errors.Is(err, errBound) {
			return nil
		}
		if !errors.Is(err, fs.ErrNotExist) || attempt == 3 {
			break
		}
	}
	if err != nil {
		return fmt.Errorf("etcdstore: root binding: %w", err)
	}
	var got binding
	if err := json.Unmarshal(b, &got); err != nil {
		return fmt.Errorf("etcdstore: root binding %s is corrupt (%v); if no other cluster uses this root, delete the file", path, err)
	}
	if got.ClusterID != want.ClusterID || got.Prefix != want.Prefix {
		return fmt.Errorf("%w: %s is bound to etcd cluster %s with prefix %q (since %s), but this client reaches cluster %s with prefix %q; "+
			"point --endpoints at the members of cluster %s, or use another root for this cluster",
			ErrForeignCluster, root, got.ClusterID, got.Prefix, got.BoundAt.Format(time.RFC3339), want.ClusterID, want.Prefix, got.ClusterID)
	}
	return nil
}

// errBound: readOrBind bound the root itself.
var errBound = errors.New("bound")

// readOrBind returns the binding at path, or writes want there if there is
// none and returns errBound.
func readOrBind(path string, want binding) ([]byte, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		// Write a temporary file, then link it into place: link fails if
		// another host bound the root first, and never leaves half a file.
		tmp, err := os.CreateTemp(filepath.Dir(path), "cluster.tmp*")
		if err != nil {
			return nil, fmt.Errorf("bind root: %w", err)
		}
		data, _ := json.MarshalIndent(want, "", "  ")
		_, werr := tmp.Write(append(data, '\n'))
		cerr := tmp.Close()
		if werr == nil && cerr == nil {
			err = os.Link(tmp.Name(), path)
		}
		os.Remove(tmp.Name())
		if werr != nil || cerr != nil {
			return nil, fmt.Errorf("bind root: %w", errors.Join(werr, cerr))
		}
		if err == nil {
			return nil, errBound
		}
		if !errors.Is(err, fs.ErrExist) {
			return nil, fmt.Errorf("bind root: %w", err)
		}
		b, err = os.ReadFile(path)
	}
	return b, err
}
