pub struct JobSpec;
