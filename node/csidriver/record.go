package csidriver

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"time"
)

// volume is one published volume as the Driver records it. The record is
// written before the bind mount is made and deleted after it is undone,
// so a mount of the Driver's always has a record (a record without its
// mount is a publish or unpublish cut short, dropped by Recover).
type volume struct {
	ID      string    `json:"volume_id"`
	Package string    `json:"package"`
	SubPath string    `json:"sub_path,omitempty"`
	Target  string    `json:"target_path"`
	Pod     pod       `json:"pod"`
	Since   time.Time `json:"since"`
}

// pod is the pod a volume is published for, from kubelet's
// podInfoOnMount attributes (empty outside Kubernetes, e.g. csi-sanity).
type pod struct {
	Namespace      string `json:"namespace,omitempty"`
	Name           string `json:"name,omitempty"`
	UID            string `json:"uid,omitempty"`
	ServiceAccount string `json:"service_account,omitempty"`
}

// holder is how `granary inspect` names the volume's holder.
func (v *volume) holder() string {
	if v.Pod.Name == "" {
		return fmt.Sprintf("CSI volume %s at %s", v.ID, v.Target)
	}
	return fmt.Sprintf("pod %s/%s (uid %s, CSI volume %s)", v.Pod.Namespace, v.Pod.Name, v.Pod.UID, v.ID)
}

// recordFile is the Driver's record of its volumes: one JSON file in the
// node's state directory, replaced atomically on every change.
type recordFile struct{ path string }

// load returns the recorded volumes (none if the file does not exist).
func (r recordFile) load() (map[string]*volume, error) {
	b, err := os.ReadFile(r.path)
	if errors.Is(err, fs.ErrNotExist) {
		return map[string]*volume{}, nil
	}
	if err != nil {
		return nil, fmt.Errorf("csi: read volume records: %w", err)
	}
	var list []*volume
	if err := json.Unmarshal(b, &list); err != nil {
		return nil, fmt.Errorf("csi: volume records %s: %w", r.path, err)
	}
	out := make(map[string]*volume, len(list))
	for _, v := range list {
		out[v.ID] = v
	}
	return out, nil
}

// save replaces the file with vols: written to a temporary file, synced,
// renamed over the old one, and the directory synced, so a crash leaves
// either the old records or the new ones.
func (r recordFile) save(vols map[string]*volume) error {
	list := make([]*volume, 0, len(vols))
	for _, v := range vols {
		list = append(list, v)
	}
	sort.Slice(list, func(i, j int) bool { return list[i].ID < list[j].ID })
	b, err := json.MarshalIndent(list, "", "  ")
	if err != nil {
		return err
	}
	dir := filepath.Dir(r.path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("csi: record directory: %w", err)
	}
	f, err := os.CreateTemp(dir, ".volumes-*.json")
	if err != nil {
		return fmt.Errorf("csi: write volume records: %w", err)
	}
	_, err = f.Write(append(b, '\n'))
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(f.Name(), r.path)
	}
	if err != nil {
		os.Remove(f.Name())
		return fmt.Errorf("csi: write volume records: %w", err)
	}
	if d, err := os.Open(dir); err == nil {
		d.Sync() //nolint:errcheck // best effort: the rename is done
		d.Close()
	}
	return nil
}

// podName is the volume's pod as "namespace/name", or "" without pod info.
func (v *volume) podName() string {
	if v.Pod.Name == "" {
		return ""
	}
	return v.Pod.Namespace + "/" + v.Pod.Name
}
